//! The process's own operating-system resources: its open-file limit, and telling a failure for want of file
//! descriptors (exwatch's own problem) from a failure of the network or the exchange.
//!
//! A leaf: the listener ([`crate::http::serve`]) sizes its connection cap from the limit, and the exchange
//! transport names a call that could not open a socket as exwatch's own fault. It changes no limit itself.

use std::io;

/// The process's soft open-file limit (RLIMIT_NOFILE), `None` when unlimited.
pub fn open_file_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// Whether an I/O error means this process (EMFILE) or the whole system (ENFILE) ran out of file descriptors.
pub fn out_of_descriptors(error: &io::Error) -> bool {
    let errno = error.raw_os_error();
    errno == Some(rustix::io::Errno::MFILE.raw_os_error()) || errno == Some(rustix::io::Errno::NFILE.raw_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emfile_and_enfile_are_out_of_descriptors_and_other_errors_are_not() {
        assert!(out_of_descriptors(&io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error())));
        assert!(out_of_descriptors(&io::Error::from_raw_os_error(rustix::io::Errno::NFILE.raw_os_error())));
        assert!(!out_of_descriptors(&io::Error::from(io::ErrorKind::ConnectionRefused)));
        assert!(!out_of_descriptors(&io::Error::from_raw_os_error(rustix::io::Errno::CONNREFUSED.raw_os_error())));
    }

    #[test]
    fn the_open_file_limit_is_read() {
        assert!(open_file_limit().is_none_or(|limit| limit > 0));
    }
}
