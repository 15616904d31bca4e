//! cp in and out of the guest: tar streams carried in STDIN/STDOUT frames.

use std::fs::File;

use crate::exec::{send_error, Writer};

pub fn copy_in(dest: &str, _reader: File, w: &Writer) {
    send_error(
        w,
        format!("copy into {dest}: not supported by this agent yet"),
    );
}

pub fn copy_out(path: &str, w: &Writer) {
    send_error(
        w,
        format!("copy out of {path}: not supported by this agent yet"),
    );
}
