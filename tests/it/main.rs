//! Integration tests against the real broker and S3 server on loopback
//! (`scripts/services.sh up` starts them) and the CXone simulator over HTTP.

mod audit;
mod chaos;
mod client;
mod docs;
mod faults;
mod hardening;
mod helpers;
mod hostile;
mod intake;
mod lifecycle;
mod ops;
mod process;
mod props;
mod quota;
mod races;
mod redis_server;
mod s3_servers;
mod safety;
mod saga;
mod sim;
mod status;
mod webhooks;
