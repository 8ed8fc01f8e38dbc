//! The kernel DBT: the engine (`dbt`) in the module, running kernel code from the code
//! cache in the kernel's own context. Stage 1 (issue 10): the environment
//! ([`env::KernelEnv`]), the per-CPU blocks ([`percpu::Blocks`]) and a self-test that
//! runs kernel functions from the cache and compares them with native runs
//! ([`selftest`]). Entry steering (IDT, LSTAR, EPT) comes next.
pub mod env;
pub mod percpu;
pub mod pool;
pub mod selftest;
pub mod steer;
