//! The control API of serin: the discovery protocol between `serin control-plane` and
//! the sidecars. The `.proto`, the server and the client arrive with the control-plane
//! issue; this crate is the place they live.
