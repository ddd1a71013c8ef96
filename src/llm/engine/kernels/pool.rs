//! A persistent thread pool for the kernels: workers started once, a job handed to them by
//! opening a new generation of a gate word, tasks claimed from an atomic counter, and the
//! caller working too. Between jobs the workers spin briefly (a decode step runs hundreds
//! of products a few microseconds apart, and a futex wake-up per product would cost more
//! than small products do), then sleep on a condition variable so an idle engine costs no
//! CPU. On a busy machine a worker may be descheduled: the caller then closes the gate after
//! doing the tasks itself and waits only for workers that actually entered the job, never
//! for one that has not woken up yet.

use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps.
const SPIN: Duration = Duration::from_micros(200);

/// A job as the workers see it: the caller's closure with its lifetime erased.
type Job = *const (dyn Fn(usize) + Sync + 'static);

/// The gate word: job generation in the high 32 bits, `CLOSED`, and the count of workers
/// inside the job in the low bits.
const CLOSED: u64 = 1 << 31;
const COUNT: u64 = CLOSED - 1;

fn generation(gate: u64) -> u64 {
    gate >> 32
}

struct Shared {
    gate: AtomicU64,
    /// Written by `run` before it opens a generation, read by workers that entered it.
    job: UnsafeCell<Option<Job>>,
    n_tasks: AtomicUsize,
    next_task: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    sleepers: AtomicUsize,
    sleep_lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is the only non-Sync field. `run` writes it only while the gate is closed
// with no worker inside (it waited for the count to reach 0), before the SeqCst store that
// opens the next generation; a worker reads it only after entering that generation with a
// SeqCst compare-exchange, which orders the read after the write.
unsafe impl Sync for Shared {}
// SAFETY: the raw pointer in `job` points to a `Sync` closure, usable from any thread.
unsafe impl Send for Shared {}

/// Threads that run the kernels' tasks. One job at a time (a lock serialises callers).
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    run_lock: Mutex<()>,
}

impl ThreadPool {
    /// A pool of `threads` threads in all: the caller's plus `threads - 1` workers.
    pub fn new(threads: usize) -> ThreadPool {
        let shared = Arc::new(Shared {
            gate: AtomicU64::new(CLOSED),
            job: UnsafeCell::new(None),
            n_tasks: AtomicUsize::new(0),
            next_task: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            sleep_lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..threads.max(1))
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("kernels-{i}"))
                    .spawn(move || worker(&shared))
                    .expect("spawn kernel thread")
            })
            .collect();
        ThreadPool { shared, workers, run_lock: Mutex::new(()) }
    }

    /// The process-wide pool of `threads` threads, started on first use and shared by every
    /// model loaded meanwhile: two loaded models then take turns on N threads (jobs are
    /// serialised by `run`) instead of spinning 2N threads on N cores. It stops when the
    /// last model using it is dropped.
    pub fn shared(threads: usize) -> Arc<ThreadPool> {
        static POOLS: Mutex<Vec<(usize, Weak<ThreadPool>)>> = Mutex::new(Vec::new());
        let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|(_, pool)| pool.strong_count() > 0);
        let threads = threads.max(1);
        if let Some(pool) = pools.iter().find(|(n, _)| *n == threads).and_then(|(_, p)| p.upgrade())
        {
            return pool;
        }
        let pool = Arc::new(ThreadPool::new(threads));
        pools.push((threads, Arc::downgrade(&pool)));
        pool
    }

    /// Threads that take part in a job (workers plus the caller).
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Run `f(0) … f(n_tasks - 1)`, spread over the pool, and return when all have run.
    /// A panic in a task is re-raised here once every thread has left the job.
    pub fn run(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if n_tasks == 0 {
            return;
        }
        if self.workers.is_empty() || n_tasks == 1 {
            (0..n_tasks).for_each(f);
            return;
        }
        let _one_job = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        let shared = &*self.shared;
        // SAFETY: only the lifetime is erased (same fat-pointer layout). `CloseAndWait`
        // keeps `run` from returning or unwinding past this frame until the gate is closed
        // and no worker is inside, and a worker only calls the job while inside.
        let job: Job = unsafe {
            std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), Job>(f as *const _)
        };
        // SAFETY: the gate is closed and empty (the previous `run` waited for that, or no
        // job ran yet), so no worker reads `job` until the store below opens the gate.
        unsafe { *shared.job.get() = Some(job) };
        shared.n_tasks.store(n_tasks, Ordering::Relaxed);
        shared.next_task.store(0, Ordering::Relaxed);
        let next = generation(shared.gate.load(Ordering::SeqCst)) + 1;
        shared.gate.store(next << 32, Ordering::SeqCst);
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = shared.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.wake.notify_all();
        }
        let close = CloseAndWait(shared);
        work(shared, f);
        drop(close);
        if shared.panicked.swap(false, Ordering::SeqCst) {
            panic!("a kernel task panicked");
        }
    }
}

/// On drop (so also while unwinding): close the gate to late workers, then wait for the
/// ones inside to finish their tasks.
struct CloseAndWait<'a>(&'a Shared);

impl Drop for CloseAndWait<'_> {
    fn drop(&mut self) {
        self.0.gate.fetch_or(CLOSED, Ordering::SeqCst);
        let mut spins = 0u32;
        while self.0.gate.load(Ordering::SeqCst) & COUNT != 0 {
            spins += 1;
            if spins < 4096 {
                std::hint::spin_loop();
            } else {
                // A worker inside was descheduled by a busy machine: let it run.
                std::thread::yield_now();
            }
        }
    }
}

/// Claim and run tasks of the current job until none are left.
fn work(shared: &Shared, f: &(dyn Fn(usize) + Sync)) {
    let n_tasks = shared.n_tasks.load(Ordering::Relaxed);
    loop {
        let task = shared.next_task.fetch_add(1, Ordering::Relaxed);
        if task >= n_tasks {
            return;
        }
        if catch_unwind(AssertUnwindSafe(|| f(task))).is_err() {
            shared.panicked.store(true, Ordering::SeqCst);
        }
    }
}

fn worker(shared: &Shared) {
    let mut seen = 0u64;
    loop {
        // Wait for a generation newer than the last one seen: spin, then sleep.
        let started = Instant::now();
        let mut spins = 0u32;
        let mut gate = shared.gate.load(Ordering::SeqCst);
        while generation(gate) == seen {
            if shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(128) || started.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                let mut guard = shared.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
                shared.sleepers.fetch_add(1, Ordering::SeqCst);
                while generation(shared.gate.load(Ordering::SeqCst)) == seen
                    && !shared.shutdown.load(Ordering::SeqCst)
                {
                    guard = shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                }
                shared.sleepers.fetch_sub(1, Ordering::SeqCst);
            }
            gate = shared.gate.load(Ordering::SeqCst);
        }
        seen = generation(gate);
        // Enter the job unless the caller has closed it already (it did the tasks).
        let entered = loop {
            if generation(gate) != seen || gate & CLOSED != 0 {
                break false;
            }
            match shared.gate.compare_exchange_weak(
                gate,
                gate + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => break true,
                Err(now) => gate = now,
            }
        };
        if !entered {
            continue;
        }
        // SAFETY: we are inside generation `seen`, whose job `run` stored before opening
        // it; `run` keeps the closure alive until we leave (the decrement below).
        let job = unsafe { (*shared.job.get()).expect("job published with its generation") };
        // SAFETY: as above, the pointee outlives this use.
        work(shared, unsafe { &*job });
        shared.gate.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _guard = self.shared.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// An output buffer that tasks on several threads write disjoint elements of.
pub(super) struct SharedOut<'a> {
    ptr: *mut f32,
    len: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: writers touch disjoint elements (the caller's contract on `write`); the buffer is
// a unique borrow for `'a`, so nothing else reads it meanwhile.
unsafe impl Sync for SharedOut<'_> {}
// SAFETY: as for Sync: f32 is Send and the borrow is unique.
unsafe impl Send for SharedOut<'_> {}

impl Default for SharedOut<'_> {
    fn default() -> Self {
        SharedOut { ptr: std::ptr::null_mut(), len: 0, _borrow: PhantomData }
    }
}

impl<'a> SharedOut<'a> {
    pub(super) fn new(out: &'a mut [f32]) -> SharedOut<'a> {
        SharedOut { ptr: out.as_mut_ptr(), len: out.len(), _borrow: PhantomData }
    }

    /// Store `value` at `index`. Callers on different threads must use different indices.
    #[inline(always)]
    pub(super) fn write(&self, index: usize, value: f32) {
        assert!(index < self.len, "output index {index} out of {}", self.len);
        // SAFETY: in bounds (checked above) of a live unique borrow; no other thread writes
        // or reads this element during the job (disjoint task ranges).
        unsafe { self.ptr.add(index).write(value) }
    }

    /// Store `values` from `index` on, as `write` does each (one copy: the AMX strips hand
    /// over sixteen consecutive outputs at a time, and sixteen checked scalar stores were
    /// some 15 % of their time).
    #[inline(always)]
    pub(super) fn write_run(&self, index: usize, values: &[f32]) {
        let end = index.checked_add(values.len()).expect("output range");
        assert!(end <= self.len, "output range {index}..{end} out of {}", self.len);
        // SAFETY: in bounds (checked above) of a live unique borrow that `values` (a shared
        // borrow of other memory) cannot overlap; no other thread writes or reads these
        // elements during the job (disjoint task ranges).
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), self.ptr.add(index), values.len()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run of outputs lands where `write` would put each value, and one reaching past the
    /// end is refused before anything is written.
    #[test]
    fn shared_out_writes_runs_in_bounds_only() {
        let mut out = vec![0f32; 8];
        let shared = SharedOut::new(&mut out);
        shared.write_run(2, &[1.0, 2.0, 3.0]);
        shared.write(7, 9.0);
        shared.write_run(8, &[]);
        let past = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            shared.write_run(6, &[5.0, 5.0, 5.0]);
        }));
        assert!(past.is_err(), "a run past the end was accepted");
        assert_eq!(out, [0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 9.0]);
    }

    #[test]
    fn every_task_runs_once_for_any_thread_count() {
        for threads in [1, 2, 3, 5] {
            let pool = ThreadPool::new(threads);
            for n_tasks in [0, 1, 2, 7, 64, 1000] {
                let counts: Vec<AtomicUsize> = (0..n_tasks).map(|_| AtomicUsize::new(0)).collect();
                pool.run(n_tasks, &|i| {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(
                    counts.iter().all(|c| c.load(Ordering::Relaxed) == 1),
                    "{threads}/{n_tasks}"
                );
            }
        }
    }

    #[test]
    fn shared_pools_are_one_per_thread_count_and_serve_two_callers() {
        let a = ThreadPool::shared(3);
        let b = ThreadPool::shared(3);
        assert!(Arc::ptr_eq(&a, &b), "same thread count, same pool");
        assert!(!Arc::ptr_eq(&a, &ThreadPool::shared(2)));
        // Two threads (two models' engines) submitting jobs at once take turns.
        let total = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for pool in [&a, &b] {
                let total = &total;
                scope.spawn(move || {
                    for _ in 0..200 {
                        pool.run(8, &|_| {
                            total.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 2 * 200 * 8);
    }

    #[test]
    fn sleeping_workers_wake_for_the_next_job() {
        let pool = ThreadPool::new(3);
        std::thread::sleep(SPIN * 20);
        let total = AtomicUsize::new(0);
        pool.run(100, &|i| {
            total.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(total.load(Ordering::Relaxed), 4950);
    }

    #[test]
    fn a_panicking_task_is_reported_and_the_pool_still_works() {
        let pool = ThreadPool::new(2);
        let result = catch_unwind(AssertUnwindSafe(|| {
            pool.run(16, &|i| {
                if i == 9 {
                    panic!("task 9 fails");
                }
            })
        }));
        assert!(result.is_err());
        let total = AtomicUsize::new(0);
        pool.run(10, &|_| {
            total.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(total.load(Ordering::Relaxed), 10);
    }
}
