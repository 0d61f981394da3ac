//! The one call fleet-proxy makes into its allocator, mimalloc, whose crate offers no safe
//! way to make it. See `proxy/src/memory.rs` for when it is made.

/// Gives back to the system the memory that the allocator holds free in the calling thread's
/// heap and in its shared arenas. Other threads' heaps are not visited.
///
/// On the process's main thread mimalloc also takes over the memory of threads that have
/// exited (as it does at the end of a program), so the call costs more the more such memory
/// there is: 2–8 ms with 10,000 connections just parked.
#[allow(unsafe_code)]
pub fn release_free() {
    // SAFETY: `mi_collect` takes no pointers, has no preconditions, and may be called from
    // any thread at any time; it works on the calling thread's heap and on the arenas under
    // their own locks. Where mimalloc is not the global allocator it finds nothing to give back.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
