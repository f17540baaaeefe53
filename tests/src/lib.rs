//! End-to-end tests of serin: real processes, sockets and clients (see tests/README.md).
