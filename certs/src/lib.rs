//! Identity and certificates for serin: the mesh CA, SPIFFE identities and workload
//! certificates. Filled in by the identity/mTLS issue.
