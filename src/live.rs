//! The answers being written now, by conversation, so that any page can follow one from
//! its start whoever asked for it (the WebChat, a scheduled job, a channel message, the
//! channel queue's recovery): each answer's reader publishes every event it reads here, and
//! a follower gets what was published so far, then the rest as it comes. This module holds
//! only the events of running answers: storing them is the assistant's business, and their
//! wire form and the `/live` endpoint are the gateway's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;

use crate::assistant::Event;
use crate::domain::ConversationId;

/// Events buffered for a follower that reads slower than the answer is written; one that
/// falls further behind is told to reload.
const FOLLOWER_BUFFER: usize = 256;

/// The running answers, by conversation (one at a time each: the turn). Cheap to clone:
/// the clones share the registry.
#[derive(Clone, Default)]
pub struct LiveAnswers(Arc<Registry>);

/// Who reads an answer, which decides whether the shutdown waits for it (`wait_idle`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// The WebChat's relay: the shutdown stops the answer through it and waits until it is
    /// stored.
    Page,
    /// The assistant's own collector (a job's, a channel message's, a recovery's answer):
    /// its caller decides what a shutdown does to it.
    Collector,
}

/// One answer's publication: feed it every event the answer's reader reads, in order.
/// `Meta` opens the answer's entry, `Done` or `Error` closes it, and dropping the
/// publisher before either (the stream ended without a last event, or its reader was
/// dropped) removes it.
pub struct Publisher {
    live: LiveAnswers,
    /// Which publication owns the entry: a newer answer in the same conversation replaces
    /// a finished one's entry, whose late events and end then leave it alone.
    relay: u64,
    reader: Reader,
    /// Known from the answer's `Meta`.
    conversation_id: Option<ConversationId>,
}

impl LiveAnswers {
    /// A publication for one answer read by `reader`.
    pub fn publisher(&self, reader: Reader) -> Publisher {
        let relay = self.0.next_relay.fetch_add(1, Ordering::Relaxed);
        Publisher { live: self.clone(), relay, reader, conversation_id: None }
    }

    /// What a follower of `id`'s running answer replays, and its channel for the rest,
    /// taken together so that no event falls between them; `None` when nothing runs.
    pub fn follow(&self, id: ConversationId) -> Option<(Vec<Event>, broadcast::Receiver<Event>)> {
        let answers = self.lock();
        let live = answers.get(&id)?;
        Some((live.seen.clone(), live.next.subscribe()))
    }

    /// Whether an answer is being written in conversation `id` (from its `Meta` on).
    pub fn is_running(&self, id: ConversationId) -> bool {
        self.lock().contains_key(&id)
    }

    /// Waits, at most `limit`, until no answer read by a page runs: at shutdown, an answer
    /// whose page left is stopped through its relay and must be stored before the process
    /// exits (the server's graceful shutdown waits only for answers a page still reads).
    /// Answers read by a collector are left to their callers (a job's run stops its own).
    pub async fn wait_idle(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.lock().values().any(|live| live.reader == Reader::Page)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConversationId, Live>> {
        self.0.answers.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Publisher {
    /// Records and passes on the answer's next event. Events before its `Meta` (a `busy`
    /// notice while the conversation's turn is taken) are not published: the answer does
    /// not run yet.
    pub fn publish(&mut self, event: &Event) {
        let mut answers = self.live.lock();
        if let Event::Meta { conversation_id, .. } = event {
            self.conversation_id = Some(*conversation_id);
            let (next, _) = broadcast::channel(FOLLOWER_BUFFER);
            let live = Live { seen: Vec::new(), next, relay: self.relay, reader: self.reader };
            answers.insert(*conversation_id, live);
        }
        let Some(id) = self.conversation_id else { return };
        let Some(live) = answers.get_mut(&id).filter(|live| live.relay == self.relay) else {
            return;
        };
        live.seen.push(event.clone());
        let _ = live.next.send(event.clone());
        if matches!(event, Event::Done { .. } | Event::Error { .. }) {
            answers.remove(&id);
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let Some(id) = self.conversation_id else { return };
        let mut answers = self.live.lock();
        if answers.get(&id).is_some_and(|live| live.relay == self.relay) {
            answers.remove(&id);
        }
    }
}

#[derive(Default)]
struct Registry {
    answers: Mutex<HashMap<ConversationId, Live>>,
    next_relay: AtomicU64,
}

/// One running answer: what was sent so far, and the channel of what comes next.
struct Live {
    seen: Vec<Event>,
    next: broadcast::Sender<Event>,
    /// The publication that owns the entry.
    relay: u64,
    reader: Reader,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::MessageId;
    use crate::llm::router::Tier;
    use crate::llm::{FinishReason, Usage};

    fn meta(id: i64) -> Event {
        Event::Meta {
            conversation_id: ConversationId(id),
            tier: Tier::Fast,
            provider: "local".into(),
            model: "m".into(),
            host: None,
            leaves_machine: false,
            user_message_id: None,
        }
    }

    fn done(message_id: i64) -> Event {
        Event::Done {
            message_id: Some(MessageId(message_id)),
            usage: Usage::default(),
            finish: FinishReason::Stop,
            total_ms: 1,
        }
    }

    fn token(text: &str) -> Event {
        Event::Token(text.into())
    }

    #[test]
    fn an_answer_is_followed_from_its_meta_to_its_last_event() {
        let live = LiveAnswers::default();
        let id = ConversationId(7);
        let mut publisher = live.publisher(Reader::Collector);
        // A `busy` notice before the answer starts is no answer yet.
        publisher.publish(&Event::Notice { kind: "busy".into(), message: "wait".into() });
        assert!(!live.is_running(id));
        assert!(live.follow(id).is_none());

        publisher.publish(&meta(7));
        publisher.publish(&token("Hel"));
        assert!(live.is_running(id));
        let (seen, mut next) = live.follow(id).expect("a running answer");
        assert_eq!(seen, vec![meta(7), token("Hel")]);

        publisher.publish(&token("lo"));
        publisher.publish(&done(3));
        assert!(!live.is_running(id), "`done` closes the entry");
        assert_eq!(next.try_recv().unwrap(), token("lo"));
        assert_eq!(next.try_recv().unwrap(), done(3));
        drop(publisher);
        assert!(!live.is_running(id));
    }

    #[test]
    fn an_answer_that_ends_without_a_last_event_is_forgotten() {
        let live = LiveAnswers::default();
        let mut publisher = live.publisher(Reader::Page);
        publisher.publish(&meta(1));
        publisher.publish(&token("cut"));
        assert!(live.is_running(ConversationId(1)));
        drop(publisher);
        assert!(!live.is_running(ConversationId(1)));
    }

    #[test]
    fn a_newer_answer_replaces_a_finished_ones_entry_whose_late_events_leave_it_alone() {
        let live = LiveAnswers::default();
        let id = ConversationId(2);
        let mut first = live.publisher(Reader::Page);
        first.publish(&meta(2));
        first.publish(&token("old"));
        // The first answer was stored and the turn passed on before its reader caught up.
        let mut second = live.publisher(Reader::Collector);
        second.publish(&meta(2));
        first.publish(&token(" late"));
        first.publish(&done(1));
        assert!(live.is_running(id), "the first answer's end closed the second's entry");
        drop(first);
        assert!(live.is_running(id), "dropping the first publisher removed the second's entry");
        let (seen, _) = live.follow(id).unwrap();
        assert_eq!(seen, vec![meta(2)]);
        second.publish(&done(2));
        assert!(!live.is_running(id));
    }

    #[tokio::test]
    async fn the_shutdown_waits_only_for_answers_a_page_reads() {
        let live = LiveAnswers::default();
        let mut collected = live.publisher(Reader::Collector);
        collected.publish(&meta(1));
        let started = std::time::Instant::now();
        live.wait_idle(Duration::from_secs(5)).await;
        assert!(started.elapsed() < Duration::from_secs(1), "waited for a collected answer");

        let mut page = live.publisher(Reader::Page);
        page.publish(&meta(2));
        let waiting = tokio::spawn({
            let live = live.clone();
            async move { live.wait_idle(Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(!waiting.is_finished(), "did not wait for the page's answer");
        page.publish(&done(4));
        tokio::time::timeout(Duration::from_secs(2), waiting).await.unwrap().unwrap();
    }
}
