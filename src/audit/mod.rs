//! What an auditor asks for: proof per termination that access went in time (`evidence
//! export`, CONTRACT §12), the manifest check behind it (`verify`), and the leavers nobody
//! told us about (`reconcile`).

pub mod export;
pub mod html;
pub mod reconcile;
pub mod status;
pub mod verify;
