//! Webhooks: each request made or decided is posted as JSON (with a
//! Slack-compatible `text`) to every configured URL, retried with backoff
//! on a thread per URL. The broker only puts a message in a bounded
//! queue and never waits: a webhook that is down never slows the data path
//! (past the queue, messages are dropped and counted in the log).

use std::{
    sync::mpsc::{sync_channel, SyncSender, TrySendError},
    time::Duration,
};

use serde_json::json;
use tracing::{debug, warn};

use crate::{config::Webhook, record::approval::Request};

/// Messages waiting to be posted, at most.
const QUEUE: usize = 1024;
/// Tries per message, and the wait before the first retry (doubled each
/// time).
const TRIES: u32 = 5;
const FIRST_RETRY: Duration = Duration::from_millis(500);

/// Where the broker tells of requests (see the module's documentation):
/// a queue and a thread per webhook, so one that is down delays no other.
pub struct Notifier {
    queues: Vec<(String, SyncSender<serde_json::Value>)>,
}

impl Notifier {
    /// Starts posting to `hooks`; `None` if there are none.
    pub fn start(hooks: &[Webhook]) -> Option<Notifier> {
        let mut queues = Vec::new();
        for hook in hooks {
            let (tx, rx) = sync_channel::<serde_json::Value>(QUEUE);
            let url = hook.url.clone();
            let spawned = std::thread::Builder::new()
                .name("webhook".into())
                .spawn(move || {
                    let agent = super::oidc::http_agent();
                    for message in rx {
                        post(&agent, &url, &message);
                    }
                });
            if let Err(e) = spawned {
                warn!(url = %hook.url, error = %e, "no thread for a webhook");
                continue;
            }
            queues.push((hook.url.clone(), tx));
        }
        (!queues.is_empty()).then_some(Notifier { queues })
    }

    /// Queues a message about `r` (`what` happened to it) for each webhook.
    pub fn tell(&self, r: &Request, what: &str) {
        let m = message(r, what);
        for (url, tx) in &self.queues {
            match tx.try_send(m.clone()) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    warn!(request = %r.id, %url, "webhook queue full: a message dropped");
                }
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }
}

/// The message about request `r`: the request itself, what happened, and
/// a `text` for chat tools.
pub fn message(r: &Request, what: &str) -> serde_json::Value {
    let asked = match &r.asked {
        crate::record::approval::Asked::Connect => format!("connect to {}", r.target),
        crate::record::approval::Asked::Statement { text, class, .. } => {
            let short: String = text.chars().take(200).collect();
            format!("{class} statement on {}: {short}", r.target)
        }
    };
    let text = format!(
        "interceptor: request {} {what}: workload {} asks for {asked} (rule {}); status {}. Approve with `interceptor approvals approve {}`.",
        r.id,
        r.requester.workload,
        r.rule,
        r.status.as_str(),
        r.id
    );
    json!({ "event": what, "text": text, "request": r })
}

fn post(agent: &ureq::Agent, url: &str, message: &serde_json::Value) {
    let mut wait = FIRST_RETRY;
    for attempt in 1..=TRIES {
        match agent.post(url).send_json(message) {
            Ok(resp) if resp.status().is_success() => {
                debug!(%url, "webhook posted");
                return;
            }
            Ok(resp) => warn!(%url, status = %resp.status(), attempt, "webhook refused a message"),
            Err(e) => warn!(%url, error = %e, attempt, "webhook unreachable"),
        }
        if attempt < TRIES {
            std::thread::sleep(wait);
            wait *= 2;
        }
    }
    warn!(%url, "webhook message given up after {TRIES} tries");
}
