//! The kernel DBT: the engine (`dbt`) in the module, running kernel code from the code
//! cache in the kernel's own context. The environment ([`env::KernelEnv`]), the per-CPU
//! blocks ([`percpu::Blocks`]), the dispatcher's memory ([`pool`]), a self-test that runs
//! kernel functions from the cache and compares them with native runs ([`selftest`], with
//! its one-CPU EPT steering check, [`steer`]), and `kdbt start --module`: a module's code
//! from the cache on every CPU, steered there by EPT and #VE ([`session`]), and
//! (experimental) `kdbt start --kernel`, the kernel's own text, whose entry text reaches
//! the cache through redirected calls ([`redirect`]) and #VE. An oops in translated code
//! is reported with its native state ([`oops`]).
pub mod env;
pub mod faults;
pub mod oops;
pub mod percpu;
pub mod pool;
pub mod redirect;
pub mod selftest;
pub mod session;
pub mod steer;
pub mod wprotect;
