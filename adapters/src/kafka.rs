//! The Kafka event bus (`rdkafka`).
//!
//! Ingest produces each normalized event to `cdp.raw.{source}`, keyed by its strongest
//! identifier, with `acks=all` and idempotence, and answers HTTP only after every delivery
//! report came back. The pipeline consumes the raw topics as one consumer group with automatic
//! offset storing off, and commits an offset only after the store holds the effects of every
//! event before it.

use crate::bus::{pack, EventBus, Polled, StreamPositions, Subscription, Undecodable};
use crate::store::{AppendBatch, AppendOutcome, BronzeRecord, JournaledEvent};
use crate::{SilverRow, StoreError};
use async_trait::async_trait;
use base64::Engine;
use chrono::{DateTime, Utc};
use cohort_messages::{
    msgs::IdentityEvent, segment::SegmentChanged, CustomerEvent, DeadLetter, ErasureCounts, ErasureTarget, Source,
};
use parking_lot::Mutex;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Streams of raw topic partitions: `(source index + 1) * 1024 + partition`, so they never
/// collide with the embedded journal's stream 0.
const PARTITIONS_PER_TOPIC: u32 = 1024;
/// Streams of `cdp.processed.events` partitions (cluster mode), after the five raw topics.
pub(crate) const PROCESSED_STREAMS: u32 = 6 * PARTITIONS_PER_TOPIC;

/// The `cdp.processed.events` partition a position was read from; `None` for other topics.
pub fn processed_partition(position: u64) -> Option<i32> {
    let (stream, _) = crate::bus::unpack(position);
    let partition = stream.checked_sub(PROCESSED_STREAMS).filter(|p| *p < PARTITIONS_PER_TOPIC)?;
    i32::try_from(partition).ok()
}

/// Topic names, optionally prefixed (tests use a unique prefix per run).
#[derive(Debug, Clone)]
pub struct Topics {
    pub prefix: String,
}

impl Topics {
    pub fn raw(&self, source: Source) -> String {
        format!("{}cdp.raw.{}", self.prefix, source.as_str())
    }
    pub fn processed(&self) -> String {
        format!("{}cdp.processed.events", self.prefix)
    }
    pub fn dlq(&self) -> String {
        format!("{}cdp.dlq", self.prefix)
    }
    pub fn segment_change(&self) -> String {
        format!("{}cdp.segment.change", self.prefix)
    }
    pub fn gdpr(&self) -> String {
        format!("{}cdp.gdpr", self.prefix)
    }
    pub fn identity(&self) -> String {
        format!("{}cdp.identity", self.prefix)
    }
}

/// Settings of the Kafka bus, from the `bus.*` configuration.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `host:port[,host:port...]`
    pub brokers: String,
    pub group_id: String,
    pub topic_prefix: String,
    pub partitions: i32,
    pub replication_factor: i32,
    /// How long a produce may wait for the broker before ingest answers 503.
    pub produce_timeout: Duration,
    pub session_timeout: Duration,
    /// Cluster mode: `cdp.processed.events` carries the profile changes each partition's owner
    /// applies, so Silver rows are not published there.
    pub routed_processed: bool,
}

impl KafkaSettings {
    /// A tenth of the session timeout (librdkafka's default is 3 s whatever the timeout): a member
    /// waiting on a rebalance sends none, so frequent ones keep a slow rebalance from expiring it,
    /// and heartbeats are how the others learn that a rebalance started.
    pub fn heartbeat_interval(&self) -> Duration {
        (self.session_timeout / 10).clamp(Duration::from_millis(100), Duration::from_secs(3))
    }

    /// Parses `kafka://host:port[,host:port]`.
    pub fn brokers_from_url(url: &str) -> Result<String, StoreError> {
        let rest = url.strip_prefix("kafka://").ok_or_else(|| {
            StoreError::invalid(format!("bus url `{url}` must look like kafka://host:port[,host:port]"))
        })?;
        let brokers = rest.trim_end_matches('/');
        if brokers.is_empty() || brokers.split(',').any(|b| !b.contains(':')) {
            return Err(StoreError::invalid(format!("bus url `{url}` must list host:port brokers")));
        }
        Ok(brokers.to_string())
    }
}

/// The raw-topic record: the normalized event and, on the first event of a payload, the raw
/// payload itself (Bronze), so nothing received is lost even before the warehouse sees it.
#[derive(Debug, Serialize, Deserialize)]
struct RawTopicRecord {
    event: CustomerEvent,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    raw: Option<RawPayloadRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
struct RawPayloadRecord {
    format: String,
    content_type: String,
    received_at: DateTime<Utc>,
    body_base64: String,
}

impl RawPayloadRecord {
    /// Back to the payload; `None` if the body is not base64 (then the payload is not Cohort's
    /// and its event alone is processed).
    fn into_record(self, source: Source) -> Option<BronzeRecord> {
        let body = base64::engine::general_purpose::STANDARD.decode(self.body_base64).ok()?;
        Some(BronzeRecord {
            source,
            format: self.format,
            content_type: self.content_type,
            received_at: self.received_at,
            body,
        })
    }
}

impl From<&BronzeRecord> for RawPayloadRecord {
    fn from(b: &BronzeRecord) -> Self {
        Self {
            format: b.format.clone(),
            content_type: b.content_type.clone(),
            received_at: b.received_at,
            body_base64: base64::engine::general_purpose::STANDARD.encode(&b.body),
        }
    }
}

fn is_fenced(e: &rdkafka::error::KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::UnknownProducerId
        )
    )
}

fn kafka_unavailable(context: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::unavailable(format!("kafka {context}: {e}"))
}

/// A failed produce: a message over the size limit (librdkafka's `message.max.bytes`, 1 MB, or
/// the broker's) fails the same way however often it is retried, so it is `TooLarge`, not
/// `Unavailable`: an ingest request answered 503 was retried forever.
fn produce_error(context: &str, e: &rdkafka::error::KafkaError) -> StoreError {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => StoreError::too_large(format!(
            "kafka {context}: the request is larger than Kafka takes as one message (1 MB by default, \
             the raw body base64-encoded); send it in smaller parts: {e}"
        )),
        _ => kafka_unavailable(context, e),
    }
}

pub struct KafkaBus {
    settings: KafkaSettings,
    topics: Topics,
    /// Replaced when librdkafka declares it fatally failed (an idempotent producer whose
    /// messages timed out during a broker outage cannot continue).
    producer: parking_lot::RwLock<FutureProducer>,
    /// The pipeline's consumer, shared with `commit`.
    consumer: Mutex<Option<Arc<StreamConsumer<LagContext>>>>,
    /// Cluster mode's consumer of `cdp.processed.events`, and the ownership it keeps.
    routed: Mutex<Option<RoutedConsumer>>,
    published: Mutex<HashMap<u32, u64>>,
    /// What the consumer groups split between their members (see `EventBus::group_partitions`).
    group_partitions: Mutex<std::collections::BTreeSet<String>>,
}

impl std::fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBus").field("brokers", &self.settings.brokers).finish_non_exhaustive()
    }
}

fn source_index(source: Source) -> u32 {
    Source::ALL.iter().position(|s| *s == source).unwrap_or(0) as u32
}

impl KafkaBus {
    /// Connects, and creates the topics that are missing.
    pub async fn connect(settings: KafkaSettings) -> Result<Arc<Self>, StoreError> {
        let topics = Topics { prefix: settings.topic_prefix.clone() };
        let producer = Self::new_producer(&settings)?;
        let bus = Arc::new(Self {
            settings,
            topics,
            producer: parking_lot::RwLock::new(producer),
            consumer: Mutex::new(None),
            group_partitions: Mutex::default(),
            routed: Mutex::new(None),
            published: Mutex::new(HashMap::new()),
        });
        bus.ensure_topics().await?;
        Ok(bus)
    }

    fn new_producer(settings: &KafkaSettings) -> Result<FutureProducer, StoreError> {
        ClientConfig::new()
            .set("bootstrap.servers", &settings.brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "2")
            .set("compression.type", "none")
            .set("message.timeout.ms", settings.produce_timeout.as_millis().to_string())
            .create()
            .map_err(|e| StoreError::invalid(format!("kafka producer config: {e}")))
    }

    /// Replaces the producer if librdkafka reports a fatal error on it, or the broker fenced it
    /// (after an outage the broker may refuse the old producer id and epoch for good).
    fn recover_producer(&self, fenced: bool) {
        let fatal = self.producer.read().client().fatal_error();
        let fatal =
            fatal.or_else(|| fenced.then(|| (RDKafkaErrorCode::ProducerFenced, "fenced by the broker".to_string())));
        if let Some((code, reason)) = fatal {
            tracing::warn!(?code, reason = %reason, "kafka producer failed fatally, creating a new one");
            match Self::new_producer(&self.settings) {
                Ok(p) => *self.producer.write() = p,
                Err(e) => tracing::error!(error = %e, "kafka producer could not be recreated"),
            }
        }
    }

    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    async fn ensure_topics(&self) -> Result<(), StoreError> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.settings.brokers)
            .create()
            .map_err(|e| StoreError::invalid(format!("kafka admin config: {e}")))?;
        let partitions = self.settings.partitions;
        let rf = self.settings.replication_factor;
        let mut names: Vec<(String, bool)> = Source::ALL.iter().map(|s| (self.topics.raw(*s), false)).collect();
        names.push((self.topics.processed(), false));
        names.push((self.topics.dlq(), false));
        names.push((self.topics.segment_change(), false));
        names.push((self.topics.gdpr(), true));
        names.push((self.topics.identity(), false));
        let new_topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|(name, compacted)| {
                let t = NewTopic::new(name, partitions, TopicReplication::Fixed(rf));
                if *compacted {
                    t.set("cleanup.policy", "compact")
                } else {
                    t
                }
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results =
            admin.create_topics(new_topics.iter(), &opts).await.map_err(|e| kafka_unavailable("create topics", e))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => return Err(kafka_unavailable(&format!("create topic {name}"), code)),
            }
        }
        let names: Vec<String> = names.into_iter().map(|(name, _)| name).collect();
        check_partitions(admin, names, partitions).await
    }

    /// A consumer in `group` that commits only what the pipeline made durable.
    fn consumer_config(&self, group: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.settings.brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            // Store nothing automatically: a rebalance commit must never cover unprocessed events.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", self.settings.session_timeout.as_millis().to_string())
            .set("heartbeat.interval.ms", self.settings.heartbeat_interval().as_millis().to_string());
        config
    }

    fn note_group_partitions(&self, found: Result<Vec<String>, StoreError>) {
        match found {
            Ok(partitions) => self.group_partitions.lock().extend(partitions),
            // Only the repair of orphaned partitions needs them; consuming goes on.
            Err(e) => tracing::warn!(error = %e, "topic metadata not read; orphaned partitions will not be detected"),
        }
    }

    fn topic_of(&self, stream: u32) -> Option<(String, i32)> {
        if stream / PARTITIONS_PER_TOPIC == PROCESSED_STREAMS / PARTITIONS_PER_TOPIC {
            return Some((self.topics.processed(), (stream % PARTITIONS_PER_TOPIC) as i32));
        }
        let idx = (stream / PARTITIONS_PER_TOPIC).checked_sub(1)? as usize;
        let source = Source::ALL.get(idx)?;
        Some((self.topics.raw(*source), (stream % PARTITIONS_PER_TOPIC) as i32))
    }

    fn source_of_stream(stream: u32) -> Option<Source> {
        let idx = (stream / PARTITIONS_PER_TOPIC).checked_sub(1)? as usize;
        Source::ALL.get(idx).copied()
    }
}

/// Kafka offsets start at 0, positions at 1: position = offset + 1, which is also the offset a
/// consumer commits ("the next one to read").
fn position_offset(kafka_offset: i64) -> u64 {
    (kafka_offset.max(0) as u64) + 1
}

#[async_trait]
impl EventBus for KafkaBus {
    async fn publish(&self, batch: AppendBatch) -> Result<AppendOutcome, StoreError> {
        let result = self.publish_once(batch).await;
        if let Err((_, fenced)) = &result {
            self.recover_producer(*fenced);
        }
        result.map_err(|(e, _)| e)
    }

    async fn subscribe(&self, with_raw: bool) -> Result<Box<dyn Subscription>, StoreError> {
        self.subscribe_group(with_raw).await
    }

    async fn commit(&self, positions: &StreamPositions) -> Result<(), StoreError> {
        self.commit_positions(positions).await
    }

    fn checkpoint_in_store(&self) -> bool {
        false
    }

    fn deduplicates_on_publish(&self) -> bool {
        false
    }

    fn published(&self) -> StreamPositions {
        let mut v: StreamPositions = self.published.lock().iter().map(|(s, o)| (*s, *o)).collect();
        v.sort_unstable();
        v
    }

    fn joined(&self) -> bool {
        let raw = self.consumer.lock().as_ref().is_none_or(|c| c.context().joined.load(Ordering::SeqCst));
        let routed = self.routed.lock().as_ref().is_none_or(|(c, _)| c.context().joined.load(Ordering::SeqCst));
        raw && routed
    }

    fn group_partitions(&self) -> Vec<String> {
        self.group_partitions.lock().iter().cloned().collect()
    }

    async fn rejoin(&self, partitions: &[String]) -> Result<(), StoreError> {
        let names = |p: &String| p.rsplit_once('/').map(|(t, _)| t.to_string());
        let topics: std::collections::HashSet<String> = partitions.iter().filter_map(names).collect();
        let raw: Vec<String> = Source::ALL.iter().map(|s| self.topics.raw(*s)).collect();
        if raw.iter().any(|t| topics.contains(t)) {
            let consumer = self.consumer.lock().clone();
            if let Some(c) = consumer {
                resubscribe(&c, &raw).await?;
            }
        }
        let processed = vec![self.topics.processed()];
        if topics.contains(&processed[0]) {
            let routed = self.routed.lock().clone();
            if let Some((c, _)) = routed {
                resubscribe(&c, &processed).await?;
            }
        }
        Ok(())
    }

    fn consumed_here(&self, positions: StreamPositions) -> StreamPositions {
        let Some(consumer) = self.consumer.lock().clone() else { return positions };
        let assigned: std::collections::HashSet<(String, i32)> = consumer
            .assignment()
            .map(|l| l.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect())
            .unwrap_or_default();
        positions.into_iter().filter(|(s, _)| self.topic_of(*s).is_some_and(|tp| assigned.contains(&tp))).collect()
    }

    fn assignment(&self) -> Vec<String> {
        let mut lists = Vec::new();
        if let Some(consumer) = self.consumer.lock().clone() {
            lists.extend(consumer.assignment().ok());
        }
        if let Some((consumer, _)) = self.routed.lock().clone() {
            lists.extend(consumer.assignment().ok());
        }
        let mut out: Vec<String> = lists
            .iter()
            .flat_map(|l| l.elements().iter().map(|e| format!("{}/{}", e.topic(), e.partition())).collect::<Vec<_>>())
            .collect();
        out.sort();
        out
    }

    async fn publish_routed(&self, changes: &[cohort_messages::cluster::RoutedChange]) -> Result<(), StoreError> {
        let topic = self.topics.processed();
        let values = changes
            .iter()
            .map(|c| serde_json::to_vec(c).map_err(|e| StoreError::invalid(format!("encoding change: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        // The partition every replica computes for the profile, not librdkafka's hash of the key.
        let records = changes.iter().zip(&values).map(|(c, v)| {
            let partition = cohort_messages::cluster::partition_of(&c.profile_id, self.settings.partitions);
            FutureRecord::<str, [u8]>::to(&topic).key(c.profile_id.as_str()).payload(v.as_slice()).partition(partition)
        });
        self.send_all(records).await
    }

    async fn subscribe_routed(
        &self,
        ownership: Arc<crate::cluster::Ownership>,
    ) -> Result<Box<dyn crate::bus::RoutedSubscription>, StoreError> {
        let consumer: StreamConsumer<RoutedContext> = self
            .consumer_config(&format!("{}.profiles", self.settings.group_id))
            .create_with_context(RoutedContext { ownership: ownership.clone(), joined: AtomicBool::new(false) })
            .map_err(|e| StoreError::invalid(format!("kafka consumer config: {e}")))?;
        consumer.subscribe(&[&self.topics.processed()]).map_err(|e| kafka_unavailable("subscribe", e))?;
        let consumer = Arc::new(consumer);
        self.note_group_partitions(partitions_of_topics(consumer.clone(), vec![self.topics.processed()]).await);
        *self.routed.lock() = Some((consumer.clone(), ownership));
        Ok(Box::new(RoutedKafkaSubscription { consumer }))
    }

    fn name(&self) -> &'static str {
        "kafka"
    }

    async fn publish_processed(&self, rows: &[SilverRow]) -> Result<(), StoreError> {
        if self.settings.routed_processed {
            return Ok(());
        }
        let producer = self.producer.read().clone();
        let topic = self.topics.processed();
        let mut futures = Vec::with_capacity(rows.len());
        for row in rows {
            let value =
                serde_json::to_vec(row).map_err(|e| StoreError::invalid(format!("encoding a processed event: {e}")))?;
            let fut = producer
                .send_result(FutureRecord::to(&topic).key(row.profile_id.as_str()).payload(&value))
                .map_err(|(e, _)| kafka_unavailable("produce processed event", &e))?;
            futures.push(fut);
        }
        for fut in futures {
            fut.await
                .map_err(|_| StoreError::unavailable("kafka producer dropped a delivery"))?
                .map_err(|(e, _)| kafka_unavailable("processed event delivery", &e))?;
        }
        Ok(())
    }

    async fn apply_retention(&self, _before: DateTime<Utc>, _covered: &StreamPositions) -> Result<u64, StoreError> {
        Ok(0)
    }

    async fn publish_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        let records: Vec<(String, Vec<u8>)> = letters
            .iter()
            .map(|l| {
                let value =
                    serde_json::to_vec(l).map_err(|e| StoreError::invalid(format!("encoding a dead letter: {e}")))?;
                Ok((l.source.as_str().to_string(), value))
            })
            .collect::<Result<_, StoreError>>()?;
        self.produce_all(&self.topics.dlq(), records).await
    }

    async fn publish_segment_changes(&self, changes: &[SegmentChanged]) -> Result<(), StoreError> {
        let records: Vec<(String, Vec<u8>)> = changes
            .iter()
            .map(|c| {
                let value = serde_json::to_vec(c)
                    .map_err(|err| StoreError::invalid(format!("encoding a segment change: {err}")))?;
                Ok((c.profile_id.as_str().to_string(), value))
            })
            .collect::<Result<_, StoreError>>()?;
        self.produce_all(&self.topics.segment_change(), records).await
    }

    async fn publish_identity(&self, events: &[IdentityEvent]) -> Result<(), StoreError> {
        let records: Vec<(String, Vec<u8>)> = events
            .iter()
            .map(|e| {
                let value = serde_json::to_vec(e)
                    .map_err(|err| StoreError::invalid(format!("encoding an identity event: {err}")))?;
                Ok((e.key().as_str().to_string(), value))
            })
            .collect::<Result<_, StoreError>>()?;
        self.produce_all(&self.topics.identity(), records).await
    }

    async fn erase_person(&self, _target: &ErasureTarget) -> Result<ErasureCounts, StoreError> {
        Ok(ErasureCounts::default())
    }

    async fn person_remnants(&self, _target: &ErasureTarget) -> Result<ErasureCounts, StoreError> {
        Ok(ErasureCounts::default())
    }

    async fn publish_gdpr(&self, records: &[(String, Option<Vec<u8>>)]) -> Result<u64, StoreError> {
        self.produce_keyed(&self.topics.gdpr(), records).await?;
        Ok(records.len() as u64)
    }
}

impl KafkaBus {
    /// Produces keyed records to one topic and waits for every delivery report.
    async fn produce_all(&self, topic: &str, records: Vec<(String, Vec<u8>)>) -> Result<(), StoreError> {
        let records: Vec<(String, Option<Vec<u8>>)> = records.into_iter().map(|(k, v)| (k, Some(v))).collect();
        self.produce_keyed(topic, &records).await
    }

    /// [`KafkaBus::produce_all`] where a `None` value is a tombstone (a record without payload).
    async fn produce_keyed(&self, topic: &str, records: &[(String, Option<Vec<u8>>)]) -> Result<(), StoreError> {
        let records = records.iter().map(|(key, value)| {
            let record = FutureRecord::<str, [u8]>::to(topic).key(key.as_str());
            match value {
                Some(v) => record.payload(v.as_slice()),
                None => record,
            }
        });
        self.send_all(records).await
    }

    /// Produces every record, then waits for all their acknowledgements. A producer the broker
    /// fenced or librdkafka failed fatally is replaced for the next call.
    async fn send_all<'a>(&self, records: impl Iterator<Item = FutureRecord<'a, str, [u8]>>) -> Result<(), StoreError> {
        let producer = self.producer.read().clone();
        let mut futures = Vec::new();
        for record in records {
            match producer.send_result(record) {
                Ok(f) => futures.push(f),
                Err((e, _)) => {
                    self.recover_producer(is_fenced(&e));
                    return Err(produce_error("produce", &e));
                }
            }
        }
        for fut in futures {
            match fut.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    self.recover_producer(is_fenced(&e));
                    return Err(produce_error("delivery", &e));
                }
                Err(_) => return Err(StoreError::unavailable("kafka producer dropped a delivery")),
            }
        }
        Ok(())
    }

    /// Produces a batch; on failure also says whether the broker fenced the producer.
    async fn publish_once(&self, batch: AppendBatch) -> Result<AppendOutcome, (StoreError, bool)> {
        let producer = self.producer.read().clone();
        let mut futures = Vec::with_capacity(batch.events.len());
        for (i, event) in batch.events.iter().enumerate() {
            let topic = self.topics.raw(event.source);
            let key = event.routing_key();
            let record = RawTopicRecord {
                event: event.clone(),
                raw: if i == 0 { batch.raw.as_ref().map(RawPayloadRecord::from) } else { None },
            };
            let value = serde_json::to_vec(&record)
                .map_err(|e| (StoreError::invalid(format!("encoding event: {e}")), false))?;
            let mut record = FutureRecord::to(&topic).key(&key).payload(&value);
            if let Some(tp) = &event.trace {
                // W3C trace context for any consumer, not only Cohort (which reads the event's).
                record = record.headers(OwnedHeaders::new().insert(Header { key: "traceparent", value: Some(tp) }));
            }
            let fut = producer.send_result(record).map_err(|(e, _)| (produce_error("produce", &e), is_fenced(&e)))?;
            futures.push((event.source, fut));
        }
        let mut seqs = Vec::with_capacity(futures.len());
        for (source, fut) in futures {
            let delivery = fut
                .await
                .map_err(|_| (StoreError::unavailable("kafka producer dropped a delivery"), false))?
                .map_err(|(e, _)| (produce_error("delivery", &e), is_fenced(&e)))?;
            let stream = (source_index(source) + 1) * PARTITIONS_PER_TOPIC + delivery.partition.max(0) as u32;
            let off = position_offset(delivery.offset);
            let mut published = self.published.lock();
            let e = published.entry(stream).or_insert(0);
            *e = (*e).max(off);
            seqs.push(Some(pack(stream, off)));
        }
        Ok(AppendOutcome { raw_seq: None, seqs })
    }

    async fn subscribe_group(&self, with_raw: bool) -> Result<Box<dyn Subscription>, StoreError> {
        let consumer: StreamConsumer<LagContext> = self
            .consumer_config(&self.settings.group_id)
            // Statistics carry each assigned partition's lag (LagContext keeps the latest).
            .set("statistics.interval.ms", "1000")
            .create_with_context(LagContext::default())
            .map_err(|e| StoreError::invalid(format!("kafka consumer config: {e}")))?;
        let names: Vec<String> = Source::ALL.iter().map(|s| self.topics.raw(*s)).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        consumer.subscribe(&refs).map_err(|e| kafka_unavailable("subscribe", e))?;
        let consumer = Arc::new(consumer);
        self.note_group_partitions(partitions_of_topics(consumer.clone(), names.clone()).await);
        *self.consumer.lock() = Some(consumer.clone());
        let topics: HashMap<String, u32> =
            Source::ALL.iter().enumerate().map(|(i, s)| (self.topics.raw(*s), i as u32 + 1)).collect();
        Ok(Box::new(KafkaSubscription { consumer, topics, with_raw }))
    }

    async fn commit_positions(&self, positions: &StreamPositions) -> Result<(), StoreError> {
        let (raw, processed): (StreamPositions, StreamPositions) =
            positions.iter().copied().filter(|(_, off)| *off != 0).partition(|(s, _)| *s < PROCESSED_STREAMS);
        if !raw.is_empty() {
            let Some(consumer) = self.consumer.lock().clone() else {
                return Err(StoreError::unavailable("kafka consumer not subscribed"));
            };
            // Only partitions this consumer holds now: the marks of one that moved to another
            // replica are stale, and committing them would set its new owner's offset back (a
            // later rebalance would replay what was applied, past the idempotency window).
            let held = self.consumed_here(raw);
            if !held.is_empty() {
                commit(consumer, self.offsets(&held)?).await?;
            }
        }
        if !processed.is_empty() {
            let Some((consumer, ownership)) = self.routed.lock().clone() else {
                return Err(StoreError::unavailable("kafka processed-events consumer not subscribed"));
            };
            // Never for a partition that moved: that could set its new owner's offset back.
            let owned: StreamPositions =
                processed.into_iter().filter(|(s, _)| ownership.owns((s % PARTITIONS_PER_TOPIC) as i32)).collect();
            let tpl = self.offsets(&owned)?;
            commit(consumer, tpl).await?;
        }
        Ok(())
    }

    fn offsets(&self, positions: &StreamPositions) -> Result<TopicPartitionList, StoreError> {
        let mut tpl = TopicPartitionList::new();
        for (stream, off) in positions {
            if let Some((topic, partition)) = self.topic_of(*stream) {
                tpl.add_partition_offset(&topic, partition, Offset::Offset(*off as i64))
                    .map_err(|e| StoreError::invalid(format!("kafka offsets: {e}")))?;
            }
        }
        Ok(tpl)
    }
}

/// Leaves the group and joins it again as a new member. The leave happens once the consumer's
/// poll loop has served the revocation; subscribing before that would cancel it.
async fn resubscribe<C: ConsumerContext + 'static>(
    consumer: &StreamConsumer<C>,
    topics: &[String],
) -> Result<(), StoreError> {
    consumer.unsubscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while consumer.assignment().map(|a| a.count() > 0).unwrap_or(false) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&refs).map_err(|e| kafka_unavailable("subscribe", e))
}

/// Fails unless every topic has `expected` partitions. A student's partition is computed from
/// `bus.partitions`: a topic with more would be written where nobody reads, a topic with fewer
/// refused, and replicas that disagree would each run an actor for the same student.
async fn check_partitions(
    admin: AdminClient<DefaultClientContext>,
    topics: Vec<String>,
    expected: i32,
) -> Result<(), StoreError> {
    tokio::task::spawn_blocking(move || {
        for topic in topics {
            let metadata = admin
                .inner()
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .map_err(|e| kafka_unavailable("topic metadata", e))?;
            for t in metadata.topics() {
                let found = t.partitions().len();
                if found != usize::try_from(expected).unwrap_or(0) {
                    return Err(StoreError::invalid(format!(
                        "kafka topic {} has {found} partitions but bus.partitions = {expected}; they must agree \
                         (set bus.partitions = {found}, or repartition the topics on a stopped cluster)",
                        t.name()
                    )));
                }
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| StoreError::unavailable(format!("kafka metadata task: {e}")))?
}

/// Every `topic/partition` of `topics`, from the broker's metadata (a blocking call, so off the
/// runtime's threads).
async fn partitions_of_topics<C: ConsumerContext + 'static>(
    consumer: Arc<StreamConsumer<C>>,
    topics: Vec<String>,
) -> Result<Vec<String>, StoreError> {
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for topic in topics {
            let metadata = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .map_err(|e| kafka_unavailable("topic metadata", e))?;
            for t in metadata.topics() {
                out.extend(t.partitions().iter().map(|p| format!("{}/{}", t.name(), p.id())));
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| StoreError::unavailable(format!("kafka metadata task: {e}")))?
}

/// Commits offsets synchronously off the runtime's threads.
async fn commit<C: ConsumerContext + 'static>(
    consumer: Arc<StreamConsumer<C>>,
    tpl: TopicPartitionList,
) -> Result<(), StoreError> {
    if tpl.count() == 0 {
        return Ok(());
    }
    tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
        .await
        .map_err(|e| StoreError::unavailable(format!("kafka commit task: {e}")))?
        .map_err(|e| kafka_unavailable("commit", e))
}

/// A record's `traceparent` header, when it has one.
fn traceparent_header<M: Message>(msg: &M) -> Option<String> {
    let headers = msg.headers()?;
    headers
        .iter()
        .find(|h| h.key == "traceparent")
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_string)
}

/// Keeps the consumer lag per assigned partition from librdkafka's statistics.
#[derive(Default)]
struct LagContext {
    lag: Mutex<Vec<(String, i32, i64)>>,
    joined: AtomicBool,
}

impl ClientContext for LagContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut lag = Vec::new();
        for (name, topic) in &statistics.topics {
            for (id, p) in &topic.partitions {
                if *id >= 0 && p.desired && p.consumer_lag >= 0 {
                    lag.push((name.clone(), *id, p.consumer_lag));
                }
            }
        }
        lag.sort();
        *self.lag.lock() = lag;
    }
}

impl ConsumerContext for LagContext {
    fn post_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        if let rdkafka::consumer::Rebalance::Assign(_) = rebalance {
            self.joined.store(true, Ordering::SeqCst);
        }
    }
}

/// Cluster mode's consumer and the ownership its rebalances maintain.
type RoutedConsumer = (Arc<StreamConsumer<RoutedContext>>, Arc<crate::cluster::Ownership>);

/// Keeps [`crate::cluster::Ownership`] in step with the group's assignment of
/// `cdp.processed.events` partitions.
struct RoutedContext {
    ownership: Arc<crate::cluster::Ownership>,
    joined: AtomicBool,
}

impl ClientContext for RoutedContext {}

fn partitions_of(list: &TopicPartitionList) -> Vec<i32> {
    list.elements().iter().map(|e| e.partition()).collect()
}

impl ConsumerContext for RoutedContext {
    fn pre_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        if let rdkafka::consumer::Rebalance::Revoke(list) = rebalance {
            self.ownership.revoke(&partitions_of(list));
        }
    }

    fn post_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        if let rdkafka::consumer::Rebalance::Assign(list) = rebalance {
            self.ownership.assign(&partitions_of(list));
            self.joined.store(true, Ordering::SeqCst);
        }
    }
}

struct RoutedKafkaSubscription {
    consumer: Arc<StreamConsumer<RoutedContext>>,
}

#[async_trait]
impl crate::bus::RoutedSubscription for RoutedKafkaSubscription {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<crate::bus::RoutedPolled, StoreError> {
        let mut out = crate::bus::RoutedPolled::default();
        let consumer = &self.consumer;
        receive(
            || consumer.recv(),
            max,
            wait,
            |msg| {
                let stream = PROCESSED_STREAMS + msg.partition().max(0) as u32;
                let seq = pack(stream, position_offset(msg.offset()));
                let payload = msg.payload().unwrap_or_default();
                match serde_json::from_slice::<cohort_messages::cluster::RoutedChange>(payload) {
                    Ok(change) => out.changes.push((seq, change)),
                    Err(e) => out.undecodable.push(Undecodable {
                        seq,
                        source: None,
                        payload: String::from_utf8_lossy(payload).into_owned(),
                        reason: e.to_string(),
                    }),
                }
            },
        )
        .await?;
        Ok(out)
    }
}

/// Takes up to `max` messages from `recv`: waits up to `wait` for the first, then only for
/// what is already buffered. An error after some messages ends the batch with them: they are
/// consumed (the consumer does not deliver them again), and dropping them while later offsets
/// are committed would lose them. An error that persists comes back on the next poll.
async fn receive<M, E: std::fmt::Display, Fut: std::future::Future<Output = Result<M, E>>>(
    mut recv: impl FnMut() -> Fut,
    max: usize,
    wait: Duration,
    mut take: impl FnMut(M),
) -> Result<(), StoreError> {
    let mut timeout = wait;
    let mut taken = 0;
    while taken < max {
        match tokio::time::timeout(timeout, recv()).await {
            Err(_) => break,
            Ok(Err(e)) if taken == 0 => return Err(kafka_unavailable("consume", e)),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, taken, "kafka consume error after part of a batch; the part goes on");
                break;
            }
            Ok(Ok(m)) => {
                take(m);
                taken += 1;
                // After the first message, only take what is already buffered.
                timeout = Duration::from_millis(1);
            }
        }
    }
    Ok(())
}

struct KafkaSubscription {
    consumer: Arc<StreamConsumer<LagContext>>,
    /// Raw topic name → source index + 1.
    topics: HashMap<String, u32>,
    /// Decode raw payloads (base64) only when the pipeline keeps them.
    with_raw: bool,
}

#[async_trait]
impl Subscription for KafkaSubscription {
    fn start(&self) -> StreamPositions {
        // Partitions are assigned by the group on the first polls; each stream starts at the
        // group's committed offset, which the first delivered position reveals.
        Vec::new()
    }

    fn lag(&self) -> Vec<(String, i32, i64)> {
        self.consumer.context().lag.lock().clone()
    }

    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Polled, StoreError> {
        let mut out = Polled::default();
        let (consumer, topics, with_raw) = (&self.consumer, &self.topics, self.with_raw);
        receive(
            || consumer.recv(),
            max,
            wait,
            |msg| {
                let Some(idx) = topics.get(msg.topic()).copied() else { return };
                let stream = idx * PARTITIONS_PER_TOPIC + msg.partition().max(0) as u32;
                let seq = pack(stream, position_offset(msg.offset()));
                let payload = msg.payload().unwrap_or_default();
                match serde_json::from_slice::<RawTopicRecord>(payload) {
                    Ok(RawTopicRecord { mut event, raw }) => {
                        if event.trace.is_none() {
                            event.trace = traceparent_header(&msg);
                        }
                        // The record carrying the raw payload names it by its own position.
                        if let Some(raw) = raw.filter(|_| with_raw).and_then(|r| r.into_record(event.source)) {
                            event.raw.seq = Some(seq);
                            out.raw.push((seq, raw));
                        }
                        out.events.push(JournaledEvent { seq, event })
                    }
                    Err(e) => out.undecodable.push(Undecodable {
                        seq,
                        source: KafkaBus::source_of_stream(stream),
                        payload: String::from_utf8_lossy(payload).into_owned(),
                        reason: e.to_string(),
                    }),
                }
            },
        )
        .await?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::unpack;

    #[test]
    fn consumers_heartbeat_every_tenth_of_their_session() {
        let with = |ms: u64| KafkaSettings {
            brokers: "k:9092".into(),
            group_id: "g".into(),
            topic_prefix: String::new(),
            partitions: 3,
            replication_factor: 1,
            produce_timeout: Duration::from_secs(10),
            session_timeout: Duration::from_millis(ms),
            routed_processed: false,
        };
        assert_eq!(with(30_000).heartbeat_interval(), Duration::from_secs(3));
        assert_eq!(with(12_000).heartbeat_interval(), Duration::from_millis(1_200));
        assert_eq!(with(6_000).heartbeat_interval(), Duration::from_millis(600));
        assert_eq!(with(600_000).heartbeat_interval(), Duration::from_secs(3), "never rarer than librdkafka's default");
    }

    #[test]
    fn broker_urls_are_checked() {
        assert_eq!(KafkaSettings::brokers_from_url("kafka://127.0.0.1:9092").ok().as_deref(), Some("127.0.0.1:9092"));
        assert_eq!(KafkaSettings::brokers_from_url("kafka://a:1,b:2/").ok().as_deref(), Some("a:1,b:2"));
        assert!(KafkaSettings::brokers_from_url("http://a:1").is_err());
        assert!(KafkaSettings::brokers_from_url("kafka://").is_err());
        assert!(KafkaSettings::brokers_from_url("kafka://nohostport").is_err());
    }

    /// Messages read before a consumer error are returned, not dropped: the consumer will not
    /// deliver them again, and later offsets would be committed past them.
    #[tokio::test]
    async fn a_consume_error_after_some_messages_keeps_them() {
        let mut queue: std::collections::VecDeque<Result<u32, &str>> =
            [Ok(1), Ok(2), Err("broker transport failure"), Ok(3)].into();
        let mut recv = move || {
            let next = queue.pop_front();
            async move {
                match next {
                    Some(r) => r,
                    None => std::future::pending().await,
                }
            }
        };
        let (mut first, mut second) = (Vec::new(), Vec::new());
        receive(&mut recv, 10, Duration::from_millis(50), |m| first.push(m)).await.unwrap();
        assert_eq!(first, [1, 2]);
        receive(&mut recv, 10, Duration::from_millis(50), |m| second.push(m)).await.unwrap();
        assert_eq!(second, [3]);
        // An error with nothing read is the poll's error.
        let mut failing = || async { Err::<u32, _>("all brokers down") };
        let e = receive(&mut failing, 10, Duration::from_millis(50), |_| {}).await.unwrap_err();
        assert!(e.message.contains("all brokers down"), "{e:?}");
    }

    #[test]
    fn kafka_offsets_map_to_positions_after_zero() {
        assert_eq!(position_offset(0), 1);
        assert_eq!(position_offset(41), 42);
        let (s, o) = unpack(pack(2 * PARTITIONS_PER_TOPIC + 3, position_offset(9)));
        assert_eq!((s, o), (2 * PARTITIONS_PER_TOPIC + 3, 10));
    }
}
