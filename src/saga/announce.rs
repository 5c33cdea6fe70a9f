//! Publishing the outcome of a finished saga again (a redelivery, a duplicate, a rescind
//! repeated): the same document as the first time, after making sure its evidence exists.

use super::journal::Journal;
use super::outcome::{OutcomeType, outcome_of};
use super::ports::Outcomes;
use super::{Deps, Verdict};
use crate::cxone::Cxone;
use crate::store::Store;

/// Publishes a finished saga's outcome again (after making sure its evidence exists).
pub(crate) async fn republish<C: Cxone, S: Store, O: Outcomes>(
    deps: &Deps<C, S>,
    j: &Journal,
    kind: OutcomeType,
    outcomes: &O,
) -> Verdict {
    if kind == OutcomeType::Compensated
        && let Err(e) = super::steps::manifest::write_rescind(deps, j).await
    {
        return Verdict::Park {
            reason: format!("writing the rescind manifest: {e}"),
        };
    }
    match outcomes.publish(&outcome_of(j, kind, &deps.settings)).await {
        Ok(()) => Verdict::Settled,
        Err(e) => Verdict::Park {
            reason: format!("publishing the outcome: {e}"),
        },
    }
}
