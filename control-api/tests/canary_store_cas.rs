//! `Store::set_weights_if`: the compare-and-set the canary analysis writes its
//! weights with (finding 2 of the review of issue #7).

mod common;

use common::weights;
use serin_control_api::server::SetWeightsIfError;

#[test]
fn set_weights_if_writes_only_over_the_expected_weights() {
    let store = common::store();
    assert_eq!(store.weights("payment"), weights(&[("v1", 95), ("v2", 5)]));
    // Expected: written.
    let change = store
        .set_weights_if("payment", &[weights(&[("v1", 95), ("v2", 5)])], &weights(&[("v1", 90), ("v2", 10)]))
        .expect("written");
    assert!(change.changed);
    // Someone else changed them meanwhile: nothing written, a distinct error.
    store.set_weights("payment", &weights(&[("v1", 70), ("v2", 30)])).expect("manual");
    let e = store
        .set_weights_if("payment", &[weights(&[("v1", 90), ("v2", 10)])], &weights(&[("v1", 80), ("v2", 20)]))
        .expect_err("refused");
    let SetWeightsIfError::Changed { current, .. } = &e else { panic!("a mismatch: {e}") };
    assert_eq!(current, &weights(&[("v1", 70), ("v2", 30)]));
    assert!(e.to_string().contains("weights changed outside the analysis"), "{e}");
    assert_eq!(store.weights("payment"), weights(&[("v1", 70), ("v2", 30)]), "unchanged");
    // Any of several expectations; a subset missing reads as 0.
    store
        .set_weights_if(
            "payment",
            &[weights(&[("v1", 1), ("v2", 99)]), weights(&[("v1", 70), ("v2", 30)])],
            &weights(&[("v1", 100)]),
        )
        .expect("second expectation");
    assert_eq!(store.weights("payment"), weights(&[("v1", 100), ("v2", 0)]));
    store
        .set_weights_if("payment", &[weights(&[("v1", 100)])], &weights(&[("v1", 50), ("v2", 50)]))
        .expect("v2 absent = 0");
    // A refusal of the weights themselves is the store's error.
    let e = store
        .set_weights_if("payment", &[weights(&[("v1", 50), ("v2", 50)])], &weights(&[("v1", 50), ("v9", 50)]))
        .expect_err("unknown subset");
    assert!(matches!(e, SetWeightsIfError::Store(_)), "{e}");
}
