// Exists so that the daemon can name this crate as a build dependency; the
// programs are the `multihome` binary target.
#![no_std]
