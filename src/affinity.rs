//! Pinning worker threads to CPUs (`affinity.worker_cpus`).
//!
//! A worker that busy-polls its socket keeps a CPU from halting, which is what takes
//! the wake-up of a sleeping CPU (tens of microseconds on a virtual machine) out of a
//! message's latency; pinned with its consumer on that CPU, the hand-over to the
//! consumer is a wake-up on the same CPU, not an interrupt to another. Each worker
//! takes one CPU of the list, the one the fewest live workers hold, and keeps it for
//! its thread's life (reconnections included).

use std::io;

use parking_lot::Mutex;

/// The CPUs the calling thread may run on (`sched_getaffinity`), in ascending order.
pub(crate) fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; the size is that of `set`.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Pins the calling thread to `cpu`.
pub(crate) fn pin_current_thread(cpu: usize) -> io::Result<()> {
    pin_current_thread_to(&[cpu])
}

/// Lets the calling thread run on `cpus`, and only there.
pub(crate) fn pin_current_thread_to(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "CPU {cpu} is beyond the {} a CPU set holds",
                    libc::CPU_SETSIZE
                ),
            ));
        }
        // SAFETY: `cpu` is below CPU_SETSIZE (checked above).
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: pid 0 is the calling thread; the size is that of `set`.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The CPUs as a list for people: `0-3,6`.
pub(crate) fn describe(cpus: &[usize]) -> String {
    let mut text = String::new();
    let mut index = 0;
    while index < cpus.len() {
        let start = cpus[index];
        let mut end = start;
        while index + 1 < cpus.len() && cpus[index + 1] == end + 1 {
            index += 1;
            end = cpus[index];
        }
        if !text.is_empty() {
            text.push(',');
        }
        if end == start {
            text.push_str(&start.to_string());
        } else {
            text.push_str(&format!("{start}-{end}"));
        }
        index += 1;
    }
    if text.is_empty() {
        text.push_str("none");
    }
    text
}

/// Hands each new worker the CPU of the list that the fewest live workers hold (the
/// first such in the list's order), and takes it back when the worker's thread ends.
#[derive(Debug)]
pub(crate) struct CpuPicker {
    /// Each CPU of the list with the number of live workers holding it.
    held: Mutex<Vec<(usize, usize)>>,
}

impl CpuPicker {
    /// None for an empty list: workers are not pinned.
    pub(crate) fn new(cpus: &[usize]) -> Option<std::sync::Arc<CpuPicker>> {
        if cpus.is_empty() {
            return None;
        }
        Some(std::sync::Arc::new(CpuPicker {
            held: Mutex::new(cpus.iter().map(|&cpu| (cpu, 0)).collect()),
        }))
    }

    /// A CPU for a new worker, held until the returned lease is dropped.
    pub(crate) fn take(self: &std::sync::Arc<CpuPicker>) -> CpuLease {
        let mut held = self.held.lock();
        let slot = held
            .iter_mut()
            .min_by_key(|(_, holders)| *holders)
            .expect("a picker has at least one CPU");
        slot.1 += 1;
        CpuLease {
            picker: std::sync::Arc::clone(self),
            cpu: slot.0,
        }
    }
}

/// One worker's hold on a CPU of a [`CpuPicker`].
#[derive(Debug)]
pub(crate) struct CpuLease {
    picker: std::sync::Arc<CpuPicker>,
    pub(crate) cpu: usize,
}

impl Drop for CpuLease {
    fn drop(&mut self) {
        let mut held = self.picker.held.lock();
        if let Some(slot) = held.iter_mut().find(|(cpu, _)| *cpu == self.cpu) {
            slot.1 = slot.1.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_take_the_least_held_cpu_and_give_it_back() {
        let picker = CpuPicker::new(&[3, 1, 2]).expect("a list");
        let first = picker.take();
        let second = picker.take();
        let third = picker.take();
        let fourth = picker.take();
        assert_eq!(
            [first.cpu, second.cpu, third.cpu, fourth.cpu],
            [3, 1, 2, 3],
            "in the list's order, then the least held"
        );
        drop(second);
        assert_eq!(picker.take().cpu, 1, "the CPU given back is the least held");
        assert!(CpuPicker::new(&[]).is_none());
    }

    #[test]
    fn cpus_are_described_as_ranges() {
        assert_eq!(describe(&[0, 1, 2, 3, 6, 8, 9]), "0-3,6,8-9");
        assert_eq!(describe(&[5]), "5");
        assert_eq!(describe(&[]), "none");
    }

    #[test]
    fn a_thread_pinned_to_an_allowed_cpu_runs_only_there() {
        let allowed = allowed_cpus().expect("sched_getaffinity");
        assert!(!allowed.is_empty());
        let last = *allowed.last().expect("one CPU at least");
        let seen = std::thread::spawn(move || {
            pin_current_thread(last).expect("pin");
            (allowed_cpus().expect("sched_getaffinity"), unsafe {
                // SAFETY: no arguments; returns the CPU the thread runs on.
                libc::sched_getcpu()
            })
        })
        .join()
        .expect("thread");
        assert_eq!(seen.0, vec![last]);
        assert_eq!(seen.1, last as i32);
        assert!(pin_current_thread(libc::CPU_SETSIZE as usize).is_err());
    }
}
