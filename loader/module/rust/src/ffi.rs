#![allow(dead_code)] // mirrors the whole header; some services serve the hypervisor (issue 3)
//! Rust's view of `kdbt_glue.h` — the glue services (`kdbt_glue_*`). The entry points
//! (`kdbt_rs_*`) are defined in `lib.rs`. Keep in step with the header: `cargo test -p xtask`
//! compares the two.
use core::ffi::{c_char, c_int, c_uint, c_ulong, c_void};

extern "C" {
    pub fn kdbt_glue_log(level: c_int, msg: *const u8, len: usize);
    pub fn kdbt_glue_panic(msg: *const u8, len: usize) -> !;

    pub fn kdbt_glue_alloc(size: usize) -> *mut c_void;
    pub fn kdbt_glue_free(ptr: *mut c_void);
    pub fn kdbt_glue_alloc_pages(order: c_uint) -> *mut c_void;
    pub fn kdbt_glue_free_pages(ptr: *mut c_void, order: c_uint);
    pub fn kdbt_glue_vmalloc_to_phys(ptr: *const c_void) -> u64;
    pub fn kdbt_glue_virt_to_phys(ptr: *const c_void) -> u64;
    pub fn kdbt_glue_phys_to_virt(phys: u64) -> *mut c_void;

    pub fn kdbt_glue_copy_to_user(to: u64, from: *const c_void, n: c_ulong) -> c_ulong;
    pub fn kdbt_glue_copy_from_user(to: *mut c_void, from: u64, n: c_ulong) -> c_ulong;

    pub fn kdbt_glue_nr_cpu_ids() -> c_uint;
    pub fn kdbt_glue_num_online_cpus() -> c_uint;
    pub fn kdbt_glue_cpu_online(cpu: c_uint) -> bool;
    pub fn kdbt_glue_this_cpu() -> c_uint;
    pub fn kdbt_glue_run_on_cpu(cpu: c_uint, func: unsafe extern "C" fn(*mut c_void), arg: *mut c_void) -> c_int;
    pub fn kdbt_glue_cpus_read_lock();
    pub fn kdbt_glue_cpus_read_unlock();

    pub fn kdbt_glue_gdt_rw(cpu: c_uint) -> u64;
    pub fn kdbt_glue_param_fake_missing() -> *const u8;
    pub fn kdbt_glue_param_fail_launch_cpu() -> c_int;
    pub fn kdbt_glue_param_hide_hv() -> c_int;
    pub fn kdbt_glue_param_fail_vmwrite_cpu() -> c_int;
    pub fn kdbt_glue_param_fail_vmwrite_field() -> c_uint;
    pub fn kdbt_glue_self_nmi();
    pub fn kdbt_glue_nmi_test(cpu: c_uint) -> c_int;

    pub fn kdbt_glue_emergency_arm(on: bool);
    pub fn kdbt_glue_has_emergency_callback() -> bool;

    pub fn kdbt_glue_rdmsr_safe(msr: u32, val: *mut u64) -> c_int;

    pub fn kdbt_glue_cache_start() -> u64;
    pub fn kdbt_glue_cache_size() -> u64;
    pub fn kdbt_glue_cache_alias() -> u64;
    pub fn kdbt_glue_cache_unalias(alias: u64);
    pub fn kdbt_glue_pool_alloc(size: usize) -> *mut c_void;
    pub fn kdbt_glue_pool_free(p: *mut c_void);
    pub fn kdbt_glue_module_text(base: *mut u64, size: *mut u64);
    pub fn kdbt_glue_module_get(name: *const c_char, base: *mut u64, size: *mut u64) -> *mut c_void;
    pub fn kdbt_glue_module_put(module: *mut c_void);
    pub fn kdbt_glue_page_alias(addr: u64) -> u64;
    pub fn kdbt_glue_module_extable(module: *mut c_void, count: *mut u32) -> u64;
    pub fn kdbt_glue_sync_tasks();
    pub fn kdbt_glue_wp_kick();
    pub fn kdbt_glue_wp_flush();
    pub fn kdbt_glue_preempt_full() -> bool;
    pub fn kdbt_glue_in_task() -> bool;
    pub fn kdbt_glue_dbt_quiesce_cpus();
    pub fn kdbt_glue_reclaim_tick(on: bool);
    pub fn kdbt_glue_oops_notifier(on: bool);
    pub fn kdbt_glue_read_kernel(dst: *mut c_void, src: u64, n: usize) -> usize;
    pub fn kdbt_glue_percpu_block(size: *mut usize) -> u64;
    pub fn kdbt_glue_per_cpu_ptr(pcp: u64, cpu: c_uint) -> u64;
    pub fn kdbt_glue_irq_save() -> c_ulong;
    pub fn kdbt_glue_irq_restore(flags: c_ulong);
    pub fn kdbt_glue_kernel_ibt() -> bool;
    pub fn kdbt_glue_indirect_thunk(reg: c_uint) -> u64;
    pub fn kdbt_glue_return_thunk() -> u64;
    pub fn kdbt_glue_kernel_function() -> u64;
    pub fn kdbt_glue_kernel_text_to_phys(va: u64) -> u64;
    pub fn kdbt_glue_dbt_case_run(which: c_uint, entry: u64) -> u64;
    pub fn kdbt_glue_dbt_case_name(which: c_uint) -> *const u8;
    pub fn kdbt_glue_dbt_case_fn(which: c_uint) -> u64;
}
