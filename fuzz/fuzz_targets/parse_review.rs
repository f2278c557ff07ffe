//! Fuzz the AdmissionReview parser and, for every body it accepts, the validating and
//! mutating decisions and the response encoding: none of them may panic.
#![no_main]

use std::sync::OnceLock;

use gm_admission::args::{Settings, WebhookArgs};
use gm_admission::Webhook;
use libfuzzer_sys::fuzz_target;

fn webhook() -> &'static Webhook {
    static W: OnceLock<Webhook> = OnceLock::new();
    W.get_or_init(|| {
        let args = WebhookArgs::try_from_flags([
            "--standalone",
            "--tls-cert",
            "unused.crt",
            "--tls-key",
            "unused.key",
            "--default-vcuda-memory",
            "4",
            "--set-scheduler-name",
            "gpu-scheduler",
        ])
        .expect("fixed flags parse");
        Webhook::standalone(Settings::from_args(&args).expect("fixed flags are valid"))
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(review) = gm_admission::parse_review(data) {
        let w = webhook();
        let _ = w.validate(&review);
        let _ = w.mutate(&review);
        let _ = w.validate_body(data);
        let _ = w.mutate_body(data);
    }
});
