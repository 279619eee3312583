//! The Strata lab: a network namespace with a bridge, the server inside it, and QEMU VMs on
//! tap devices whose serial consoles the tests read.
