//! The agent's heap is wiped on free. Command output, copied files and
//! secret values pass through the agent's buffers; glibc keeps a freed
//! chunk's bytes (merged into an arena's top chunk they survive intact),
//! and guest memory goes into snapshots. The guest kernel zeroes freed
//! pages (`init_on_free=1`); this does the same one level up, so a scrubbed
//! secret that an exec printed cannot linger in the agent's arenas.
//! Reallocation goes through the trait's default (alloc, copy, dealloc),
//! so the old block is wiped too.

use std::alloc::{GlobalAlloc, Layout, System};

pub struct ZeroOnFree;

// SAFETY: every call forwards to `System` with the caller's layout; the
// only addition is wiping a block the caller owns and is about to free.
unsafe impl GlobalAlloc for ZeroOnFree {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was returned by `alloc` for `layout`, so it is valid
        // for `layout.size()` bytes and still ours. explicit_bzero is a
        // call the optimiser may not drop as a dead store before free.
        unsafe {
            libc::explicit_bzero(ptr.cast(), layout.size());
            System.dealloc(ptr, layout);
        }
    }
}
