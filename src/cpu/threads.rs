//! Channel-parallel loops over torch's own OpenMP team (libgomp, found among the loaded
//! libraries on Linux) or scoped threads, and the raw writers through which threads owning
//! disjoint channels fill one output tensor.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

/// Runs `work(&mut scratch, c)` for every channel `c`, on up to `threads` threads that each
/// take the next channel as they finish one (each thread builds its own `scratch` with `init`).
///
/// The threads are torch's own OpenMP team when libgomp is loaded (torch's intra-op pool, so no
/// extra threads compete with its spinning workers), else scoped threads.
pub(crate) fn for_channels<S, I, W>(channels: usize, threads: usize, init: I, work: W)
where
    I: Fn() -> S + Sync,
    W: Fn(&mut S, usize) + Sync,
{
    for_channels_on(channels, threads, true, init, work)
}

/// [`for_channels`], with torch's OpenMP team only when `openmp` (tests run both).
pub(crate) fn for_channels_on<S, I, W>(
    channels: usize,
    threads: usize,
    openmp: bool,
    init: I,
    work: W,
) where
    I: Fn() -> S + Sync,
    W: Fn(&mut S, usize) + Sync,
{
    let next = AtomicUsize::new(0);
    let run = || {
        let mut scratch = init();
        loop {
            let c = next.fetch_add(1, Ordering::Relaxed);
            if c >= channels {
                break;
            }
            work(&mut scratch, c);
        }
    };
    let threads = threads.clamp(1, channels.max(1));
    if threads == 1 {
        run();
    } else if !(openmp && omp::parallel(threads, &run)) {
        thread::scope(|scope| {
            for _ in 1..threads {
                scope.spawn(run);
            }
            run();
        });
    }
}

/// torch's OpenMP runtime (libgomp), found among the loaded libraries at run time (Linux; other
/// systems use scoped threads).
#[cfg(target_os = "linux")]
mod omp {
    use std::ffi::{c_uint, c_void};
    use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
    use std::sync::{Mutex, OnceLock};

    type Parallel =
        unsafe extern "C" fn(unsafe extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);

    fn gomp_parallel() -> Option<Parallel> {
        static FOUND: OnceLock<Option<usize>> = OnceLock::new();
        let address = *FOUND.get_or_init(|| {
            // SAFETY: RTLD_NOLOAD only looks up a library already loaded (torch's libgomp), and
            // both names are NUL-terminated C strings.
            let handle = unsafe {
                libc::dlopen(
                    c"libgomp.so.1".as_ptr(),
                    libc::RTLD_LAZY | libc::RTLD_NOLOAD,
                )
            };
            if handle.is_null() {
                return None;
            }
            // SAFETY: `handle` is a live handle from dlopen.
            let symbol = unsafe { libc::dlsym(handle, c"GOMP_parallel".as_ptr()) };
            (!symbol.is_null()).then_some(symbol as usize)
        });
        // SAFETY: the address is libgomp's `GOMP_parallel`, which has had this signature in
        // libgomp's ABI since GCC 4.9.
        address.map(|a| unsafe { std::mem::transmute::<usize, Parallel>(a) })
    }

    struct Job<'a> {
        run: &'a (dyn Fn() + Sync),
        panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    }

    unsafe extern "C" fn trampoline(data: *mut c_void) {
        // SAFETY: `data` is the `Job` that `parallel` keeps alive until GOMP_parallel returns.
        let job = unsafe { &*(data as *const Job<'_>) };
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| (job.run)())) {
            if let Ok(mut slot) = job.panic.lock() {
                slot.get_or_insert(payload);
            }
        }
    }

    /// Runs `run` on every thread of an OpenMP team of up to `threads`; false when libgomp is
    /// not loaded (nothing ran). A panic in any thread is re-raised here.
    pub fn parallel(threads: usize, run: &(dyn Fn() + Sync)) -> bool {
        let Some(gomp) = gomp_parallel() else {
            return false;
        };
        let job = Job {
            run,
            panic: Mutex::new(None),
        };
        // SAFETY: the trampoline only reads `job`, which outlives the call; GOMP_parallel
        // returns after every thread of the team has finished.
        unsafe {
            gomp(
                trampoline,
                &job as *const Job<'_> as *mut c_void,
                threads as c_uint,
                0,
            )
        };
        if let Some(payload) = job.panic.into_inner().ok().flatten() {
            resume_unwind(payload);
        }
        true
    }
}

#[cfg(not(target_os = "linux"))]
mod omp {
    /// No OpenMP lookup off Linux: the caller runs scoped threads.
    pub fn parallel(_threads: usize, _run: &(dyn Fn() + Sync)) -> bool {
        false
    }
}

/// Per-channel records of `width` values that threads owning disjoint channels write.
pub(crate) struct Records {
    ptr: *mut f64,
    width: usize,
}

// SAFETY: each channel's record is written by the one thread that took that channel.
unsafe impl Send for Records {}
// SAFETY: as above: shared references only reach disjoint records.
unsafe impl Sync for Records {}

impl Records {
    pub(crate) fn new(values: &mut [f64], width: usize) -> Self {
        Records {
            ptr: values.as_mut_ptr(),
            width,
        }
    }

    /// Channel `c`'s record.
    ///
    /// # Safety
    /// `c` is within the records and only the calling thread holds channel `c`.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn get(&self, c: usize) -> &mut [f64] {
        // SAFETY: the caller keeps `c` within the records and holds channel `c` alone.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(c * self.width), self.width) }
    }
}

/// How many threads a job of `elements` input elements is worth (one below ~64k).
pub fn threads_for(elements: usize, available: usize) -> usize {
    if elements < 1 << 16 {
        1
    } else {
        available.max(1)
    }
}

/// A raw pointer to an NCHW tensor that threads owning disjoint channels write through.
pub(crate) struct PlaneWriter<T>(pub(crate) *mut T);

// SAFETY: every thread writes only the planes of its own channels (see `plane`).
unsafe impl<T: Send> Send for PlaneWriter<T> {}
// SAFETY: as above: shared references only reach disjoint planes.
unsafe impl<T: Send> Sync for PlaneWriter<T> {}

impl<T> PlaneWriter<T> {
    /// Plane `index` of `len` elements.
    ///
    /// # Safety
    /// The plane lies inside the tensor and no other thread touches it meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn plane(&self, index: usize, len: usize) -> &mut [T] {
        // SAFETY: the caller keeps the plane inside the tensor and holds it alone.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(index * len), len) }
    }
}
