//! CPU hotplug: a CPU coming online is virtualized, one going offline devirtualized first
//! (the callbacks run under the hotplug write lock, see the module comment of `hv`).
use super::*;

/// CPU hotplug: a CPU came online while loaded (runs on that CPU's hotplug thread).
pub fn cpu_online(cpu: u32) -> Result<(), String> {
    let mut guard = STATE.lock();
    let Some(st) = guard.as_mut() else { return Ok(()) };
    let r = launch_cpu(st, cpu);
    match &r {
        Ok(()) => kinfo!("cpu{} came online: virtualized", cpu),
        Err(e) => kwarn!("cpu{} came online but cannot be virtualized: {}", cpu, e),
    }
    r
}

/// CPU hotplug: a CPU is going offline: devirtualize it first.
pub fn cpu_offline(cpu: u32) -> Result<(), String> {
    let mut guard = STATE.lock();
    let Some(st) = guard.as_mut() else { return Ok(()) };
    let r = devirt_cpu(st, cpu);
    match &r {
        Ok(()) => kinfo!("cpu{} going offline: devirtualized", cpu),
        Err(e) => kwarn!("cpu{} going offline: {}", cpu, e),
    }
    r
}
