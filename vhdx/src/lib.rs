//! The VHDX format (MS-VHDX v1.0): fixed, dynamic and differencing disks, parent chains and
//! the log. Synchronous, no network, no unsafe code.
#![forbid(unsafe_code)]
