//! Integration tests against the real broker and S3 server on loopback
//! (`scripts/services.sh up` starts them) and the CXone simulator over HTTP.

mod client;
mod docs;
mod helpers;
mod intake;
mod lifecycle;
mod ops;
mod process;
mod safety;
mod saga;
mod sim;
