//! `cohort-bench`: the load generator behind BENCHMARKS.md.
//!
//! It plays realistic mixed traffic from synthetic EU students through the public HTTP API (the
//! same paths, authentication and payload shapes the real sources use), then measures what a
//! customer of Cohort feels: how fast accepted events reach their profiles, and how fast the
//! Profile API answers under a fixed offered load. The figures are a report: missing a target
//! still exits 0; only a broken harness (no server, bad flags, unwritable output) does not.

use anyhow::{anyhow, bail, Context};
use base64::Engine;
use chrono::{SecondsFormat, Utc};
use clap::Parser;
use cohort::demo::DemoServer;
use cohort::payloads;
use cohort::SystemOptions;
use cohort_actors::normalize::signature::sign_twilio;
use cohort_config::Config;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The same allocator as the `cohort` binary, so in-process figures match production.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The targets of the issue, for a 2-core machine.
const TARGET_EVENTS_PER_SEC: f64 = 50_000.0;
const TARGET_BATCH: u64 = 100;
const TARGET_E2P_P99_MS: f64 = 50.0;
const TARGET_PROFILE_P99_MS: f64 = 5.0;
const TARGET_PROFILE_RPS: u64 = 5_000;
/// The Profile API target only counts if the offered rate was actually delivered.
const PROFILE_RPS_TOLERANCE: f64 = 0.95;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "cohort-bench",
    version,
    about = "Load generator: mixed source traffic from synthetic students, end-to-end events/s, \
             event-to-profile and Profile API latency"
)]
struct Cli {
    /// Target an already running Cohort at this base URL instead of starting one in-process.
    #[arg(long)]
    url: Option<String>,
    /// Profile API bearer token (default: the built-in development token).
    #[arg(long, env = "COHORT_API_TOKEN")]
    api_token: Option<String>,
    /// Segment write key of the web source (default: the built-in development key).
    #[arg(long)]
    web_write_key: Option<String>,
    /// Segment write key of the mobile source (default: the built-in development key).
    #[arg(long)]
    mobile_write_key: Option<String>,
    /// Bearer token of the Salesforce CDC relay (default: the built-in development token).
    #[arg(long)]
    crm_token: Option<String>,
    /// Twilio auth token the WhatsApp webhooks are signed with (default: the development token).
    #[arg(long)]
    twilio_auth_token: Option<String>,
    /// The URL Twilio signatures cover, when the server sets `sources.whatsapp.public_url`.
    #[arg(long)]
    twilio_url: Option<String>,
    /// Extra TOML for the in-process Cohort, e.g. `[identity]\nshards = 8` (ignored with --url).
    #[arg(long, default_value = "")]
    server_toml: String,
    /// Synthetic students (default 10,000; 1,000 with --quick).
    #[arg(long)]
    students: Option<u32>,
    /// Events to send in phase 1 (default 200,000; 10,000 with --quick).
    #[arg(long)]
    events: Option<u64>,
    /// Events per Segment batch request.
    #[arg(long, default_value_t = TARGET_BATCH)]
    batch: u64,
    /// Concurrent ingest requests (HTTP connections).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Share of events sent as single calls from Salesforce CDC, SendGrid and Twilio WhatsApp;
    /// the rest are Segment batches from the web and the mobile app.
    #[arg(long, default_value_t = 0.10)]
    other_share: f64,
    /// Share of students who reveal email and phone (identify, CRM, email, WhatsApp).
    #[arg(long, default_value_t = 0.30)]
    identified_share: f64,
    /// Pace ingest at this many events/s (default: as fast as --concurrency allows).
    #[arg(long)]
    ingest_rate: Option<f64>,
    /// Offered Profile API request rate in phase 2 (0 skips phase 2).
    #[arg(long)]
    profile_rps: Option<u64>,
    /// Profile API requests in flight at most in phase 2, like a service with a keep-alive pool
    /// of this many connections; a request waiting for its turn still counts the wait (latency
    /// is from the scheduled send).
    #[arg(long, default_value_t = 64)]
    profile_concurrency: usize,
    /// Duration of phase 2 in seconds (default 10; 2 with --quick).
    #[arg(long)]
    profile_seconds: Option<f64>,
    /// Give up waiting for accepted events to reach their profiles after this many seconds.
    #[arg(long, default_value_t = 120)]
    settle_timeout_secs: u64,
    /// Where the JSON report goes.
    #[arg(long, default_value = "bench-results/bench.json")]
    out: PathBuf,
    /// Small smoke run (1,000 students, 10,000 events, 2 s of profile load) for CI.
    #[arg(long)]
    quick: bool,
    /// Seed of the traffic generator, so runs are repeatable.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
    /// Kafka mode: also run phase 1 on Kafka (these brokers, host:port) + MongoDB, and measure
    /// the broker's raw produce/consume rate in the same run; prints both ratios.
    #[arg(long, requires = "compare_mongodb")]
    compare_kafka: Option<String>,
    /// The MongoDB URL of the Kafka mode.
    #[arg(long, requires = "compare_kafka")]
    compare_mongodb: Option<String>,
}

/// The run's parameters after --quick and defaults are applied.
#[derive(Debug, Clone)]
struct Settings {
    students: u32,
    events: u64,
    batch: u64,
    concurrency: usize,
    other_share: f64,
    identified_share: f64,
    ingest_rate: Option<f64>,
    profile_rps: u64,
    profile_concurrency: usize,
    profile_seconds: f64,
    settle_timeout: Duration,
    seed: u64,
    quick: bool,
    quiet: bool,
}

impl Settings {
    fn from_cli(cli: &Cli) -> anyhow::Result<Self> {
        let s = Settings {
            students: cli.students.unwrap_or(if cli.quick { 1_000 } else { 10_000 }),
            events: cli.events.unwrap_or(if cli.quick { 10_000 } else { 200_000 }),
            batch: cli.batch,
            concurrency: cli.concurrency,
            other_share: cli.other_share,
            identified_share: cli.identified_share,
            ingest_rate: cli.ingest_rate,
            profile_rps: cli.profile_rps.unwrap_or(TARGET_PROFILE_RPS),
            profile_concurrency: cli.profile_concurrency,
            profile_seconds: cli.profile_seconds.unwrap_or(if cli.quick { 2.0 } else { 10.0 }),
            settle_timeout: Duration::from_secs(cli.settle_timeout_secs),
            seed: cli.seed,
            quick: cli.quick,
            quiet: cli.quiet,
        };
        if s.students == 0 || s.events == 0 {
            bail!("--students and --events must be at least 1");
        }
        if s.students > 10_000_000 {
            bail!("--students is limited to 10,000,000 (phone numbers are unique per student)");
        }
        if !(1..=2_500).contains(&s.batch) {
            bail!("--batch must be between 1 and 2,500 (Segment's batch limit)");
        }
        if s.concurrency == 0 || s.profile_concurrency == 0 {
            bail!("--concurrency and --profile-concurrency must be at least 1");
        }
        if !(0.0..=1.0).contains(&s.other_share) || !(0.0..=1.0).contains(&s.identified_share) {
            bail!("--other-share and --identified-share are fractions between 0 and 1");
        }
        if s.ingest_rate.is_some_and(|r| r.is_nan() || r <= 0.0 || r.is_infinite()) {
            bail!("--ingest-rate must be a positive number of events per second");
        }
        if s.profile_rps > 0
            && (s.profile_seconds.is_nan() || s.profile_seconds <= 0.0 || s.profile_seconds.is_infinite())
        {
            bail!("--profile-seconds must be positive");
        }
        Ok(s)
    }
}

// ---------------------------------------------------------------------------------------------
// Credentials and synthetic students

/// Prebuilt header values, so the hot loop does no base64 or formatting per request.
#[derive(Debug, Clone)]
struct Creds {
    web_basic: String,
    mobile_basic: String,
    crm_bearer: String,
    api_bearer: String,
    twilio_token: String,
    twilio_url: String,
}

impl Creds {
    fn new(cli: &Cli, config: &Config, base: &str) -> anyhow::Result<Self> {
        let b64 = |key: &str| base64::engine::general_purpose::STANDARD.encode(format!("{key}:"));
        let web = cli.web_write_key.clone().unwrap_or_else(|| config.sources.web.write_key.clone());
        let mobile = cli.mobile_write_key.clone().unwrap_or_else(|| config.sources.mobile.write_key.clone());
        let crm = cli.crm_token.clone().unwrap_or_else(|| config.sources.crm.token.clone());
        let api = match &cli.api_token {
            Some(t) => t.clone(),
            None => config.auth.api_tokens.first().cloned().ok_or_else(|| anyhow!("no API token configured"))?,
        };
        let twilio_token = cli.twilio_auth_token.clone().unwrap_or_else(|| config.sources.whatsapp.auth_token.clone());
        let twilio_base = match (&cli.twilio_url, config.sources.whatsapp.public_url.trim()) {
            (Some(u), _) => u.trim_end_matches('/').to_string(),
            (None, "") => format!("{base}/webhooks/twilio/whatsapp"),
            (None, public) => format!("{}/webhooks/twilio/whatsapp", public.trim_end_matches('/')),
        };
        Ok(Creds {
            web_basic: format!("Basic {}", b64(&web)),
            mobile_basic: format!("Basic {}", b64(&mobile)),
            crm_bearer: format!("Bearer {crm}"),
            api_bearer: format!("Bearer {api}"),
            twilio_token,
            twilio_url: twilio_base,
        })
    }
}

const FIRST_NAMES: &[&str] = &[
    "Max", "Sophie", "Lukas", "Emma", "Luca", "Chiara", "Hugo", "Lea", "Mateo", "Lucia", "Daan", "Julia", "Jakub",
    "Zuzana", "Sean", "Aoife", "Elias", "Ingrid", "Nikos", "Eleni", "Jonas", "Marta", "Pierre", "Anna",
];
const LAST_NAMES: &[&str] = &[
    "Mustermann",
    "Dubois",
    "Rossi",
    "Garcia",
    "Devries",
    "Nowak",
    "Novak",
    "Murphy",
    "Andersson",
    "Papadopoulos",
    "Schmidt",
    "Moreau",
    "Bianchi",
    "Fernandez",
    "Jansen",
    "Kowalski",
    "Svoboda",
    "Kelly",
    "Nilsson",
    "Georgiou",
];
/// Country, city and a mobile prefix that leaves seven digits for the subscriber number.
const COUNTRIES: &[(&str, &str, &str)] = &[
    ("DE", "Berlin", "+491512"),
    ("FR", "Paris", "+3361"),
    ("ES", "Madrid", "+3461"),
    ("NL", "Amsterdam", "+3161"),
    ("IT", "Milano", "+39347"),
    ("DE", "Munich", "+491522"),
];
const PROGRAMMES: &[(&str, &str)] = &[
    ("/programmes/mba", "MBA"),
    ("/programmes/msc-data-science", "MSc Data Science"),
    ("/programmes/bsc-computer-science", "BSc Computer Science"),
    ("/programmes/psychology", "Psychology"),
    ("/programmes/ma-international-management", "MA International Management"),
    ("/programmes/msc-artificial-intelligence", "MSc Artificial Intelligence"),
];
const WEB_PAGES: &[&str] = &["/", "/admissions/apply", "/fees", "/scholarships", "/campus/berlin", "/open-days"];
const WEB_TRACKS: &[&str] = &["Brochure Downloaded", "Application Started", "Open Day Registered", "Chat Opened"];
const APP_TRACKS: &[&str] =
    &["App Opened", "Lecture Viewed", "Assignment Submitted", "Timetable Viewed", "Course Enrolled", "Grade Viewed"];
const SENDGRID_EVENTS: &[&str] = &["delivered", "delivered", "open", "open", "click", "processed"];
const WHATSAPP_TEXTS: &[&str] = &[
    "Hi, when is the deadline for the MBA?",
    "How much are the tuition fees for MSc Data Science?",
    "Is there a scholarship for Computer Science?",
    "Thanks, the open day was great!",
    "I still have not received my admission letter, this is frustrating",
    "Wann ist die Bewerbungsfrist für Psychologie?",
    "Do I need a visa to study Artificial Intelligence in Berlin?",
];
const ENROLLMENT_STATUSES: &[&str] = &["inquiry", "applicant", "admitted", "enrolled"];

/// A cheap integer hash, so student attributes are a pure function of (seed, index).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Synthetic students. Nothing is stored per student: every identifier derives from the
/// index and the run tag (so reruns against one server never collide), keeping memory flat.
#[derive(Debug, Clone)]
struct Students {
    n: u32,
    run: String,
    seed: u64,
    identified_permille: u64,
    phone_offset: u64,
}

impl Students {
    fn pick(&self, rng: &mut StdRng) -> u32 {
        rng.gen_range(0..self.n)
    }
    fn identified(&self, i: u32) -> bool {
        mix(self.seed ^ u64::from(i)) % 1000 < self.identified_permille
    }
    fn user_id(&self, i: u32) -> String {
        format!("stu-{}-{i:06}", self.run)
    }
    fn anonymous_id(&self, i: u32) -> String {
        format!("anon-{}-{i:06}", self.run)
    }
    fn device_id(&self, i: u32) -> String {
        format!("dev-{}-{i:06}", self.run)
    }
    fn first(&self, i: u32) -> &'static str {
        FIRST_NAMES[i as usize % FIRST_NAMES.len()]
    }
    fn last(&self, i: u32) -> &'static str {
        LAST_NAMES[(i as usize / FIRST_NAMES.len()) % LAST_NAMES.len()]
    }
    fn email(&self, i: u32) -> String {
        format!("{}.{}.{}{i}@students.example.eu", self.first(i), self.last(i), self.run).to_lowercase()
    }
    fn country(&self, i: u32) -> (&'static str, &'static str, &'static str) {
        COUNTRIES[(i as usize / 7) % COUNTRIES.len()]
    }
    /// E.164, unique within the run (fewer than 10 million students per country prefix).
    fn phone(&self, i: u32) -> String {
        format!("{}{:07}", self.country(i).2, (u64::from(i) + self.phone_offset) % 10_000_000)
    }
    /// An 18-character Contact id.
    fn salesforce_id(&self, i: u32) -> String {
        format!("003{}{i:09}", &self.run[..6])
    }
    fn identify_traits(&self, i: u32) -> Value {
        let (country, city, _) = self.country(i);
        json!({
            "email": self.email(i),
            "phone": self.phone(i),
            "firstName": self.first(i),
            "lastName": self.last(i),
            "address": { "city": city, "country": country },
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic plan and request building

/// Which kind of request a unit of work is; also the key of per-kind statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    WebBatch,
    MobileBatch,
    SalesforceCdc,
    Sendgrid,
    Whatsapp,
}

impl Kind {
    const ALL: [Kind; 5] = [Kind::WebBatch, Kind::MobileBatch, Kind::SalesforceCdc, Kind::Sendgrid, Kind::Whatsapp];
    fn as_str(self) -> &'static str {
        match self {
            Kind::WebBatch => "segment_web_batch",
            Kind::MobileBatch => "segment_mobile_batch",
            Kind::SalesforceCdc => "salesforce_cdc",
            Kind::Sendgrid => "sendgrid",
            Kind::Whatsapp => "twilio_whatsapp",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// How phase 1's events are cut into requests. Batches and single calls are interleaved evenly
/// over the run, so the mix is the same at every moment rather than batches first.
#[derive(Debug, Clone, Copy)]
struct Plan {
    segment_events: u64,
    batch: u64,
    batches: u64,
    singles: u64,
    units: u64,
}

#[derive(Debug, Clone, Copy)]
enum Unit {
    Batch { events: u64 },
    Single { index: u64 },
}

impl Plan {
    fn new(s: &Settings) -> Self {
        let segment_events = ((s.events as f64) * (1.0 - s.other_share)).round() as u64;
        let singles = s.events - segment_events;
        let batches = segment_events.div_ceil(s.batch);
        Plan { segment_events, batch: s.batch, batches, singles, units: batches + singles }
    }

    /// Unit `j` is a batch when the even spread of batches over units steps at `j`.
    fn unit(&self, j: u64) -> Unit {
        let before = (u128::from(j) * u128::from(self.batches) / u128::from(self.units)) as u64;
        let after = (u128::from(j + 1) * u128::from(self.batches) / u128::from(self.units)) as u64;
        if after > before {
            Unit::Batch { events: self.batch.min(self.segment_events - before * self.batch) }
        } else {
            Unit::Single { index: j - before }
        }
    }
}

/// One request ready to send.
struct Built {
    kind: Kind,
    url: String,
    auth: Option<String>,
    content_type: &'static str,
    extra_header: Option<(&'static str, String)>,
    body: Vec<u8>,
    events: u64,
    /// Students whose `userId` this request carries: once accepted, the Profile API can find them.
    user_ids: Vec<u32>,
}

/// What request bodies are made from: the run's students and the server's credentials.
struct TrafficBuilder<'a> {
    base: &'a str,
    creds: &'a Creds,
    students: &'a Students,
    replay_base: u64,
}

/// Phase 1's requests, rendered before the clock starts. Building JSON with `serde_json::Value`
/// cost about a tenth of the machine's CPU during the phase, taken from the server it measures.
struct Traffic {
    units: Vec<std::sync::Mutex<Option<Built>>>,
    bytes: usize,
    rendered_in: Duration,
}

impl Traffic {
    /// Renders every unit of the plan in order from one seeded generator, so a seed names the
    /// exact traffic. Timestamps are the rendering time: a paced run sends its last events
    /// later, as a client that batches does.
    fn prepare(students: &Students, creds: &Creds, base: &str, s: &Settings) -> anyhow::Result<Self> {
        let started = Instant::now();
        let plan = Plan::new(s);
        let builder = TrafficBuilder {
            base,
            creds,
            students,
            replay_base: (Utc::now().timestamp_millis().max(0) as u64) * 1_000,
        };
        let mut rng = StdRng::seed_from_u64(mix(s.seed));
        let prefix = format!("{}-p", students.run);
        let mut seq = 0u64;
        let mut units = Vec::with_capacity(usize::try_from(plan.units).unwrap_or(0));
        let mut bytes = 0;
        for j in 0..plan.units {
            let built = builder.build(plan.unit(j), &mut rng, &prefix, &mut seq)?;
            bytes += built.body.len();
            units.push(std::sync::Mutex::new(Some(built)));
        }
        Ok(Traffic { units, bytes, rendered_in: started.elapsed() })
    }

    /// Hands unit `j` to the one worker that drew it.
    fn take(&self, j: u64) -> Option<Built> {
        let slot = self.units.get(usize::try_from(j).ok()?)?;
        slot.lock().ok()?.take()
    }
}

/// Everything the ingest workers share.
struct IngestCtx {
    http: reqwest::Client,
    traffic: Traffic,
    plan: Plan,
    next_unit: AtomicU64,
    known: Vec<AtomicBool>,
    answered_events: AtomicU64,
    accepted_events: AtomicU64,
    started: Instant,
    seconds_per_unit: Option<f64>,
}

fn pick<'a>(rng: &mut StdRng, items: &[&'a str]) -> &'a str {
    items[rng.gen_range(0..items.len())]
}

impl TrafficBuilder<'_> {
    fn build(&self, unit: Unit, rng: &mut StdRng, msg_prefix: &str, msg_seq: &mut u64) -> anyhow::Result<Built> {
        let mut next_id = || {
            *msg_seq += 1;
            format!("{msg_prefix}-{}", *msg_seq)
        };
        let st = &self.students;
        let now = Utc::now();
        match unit {
            Unit::Batch { events } => {
                let mobile = rng.gen_bool(0.4);
                let mut items = Vec::with_capacity(events as usize);
                let mut user_ids = Vec::new();
                for _ in 0..events {
                    let i = st.pick(rng);
                    let r: f64 = rng.gen();
                    let item = if mobile {
                        user_ids.push(i);
                        let mut v = if r < 0.05 {
                            let traits = if st.identified(i) {
                                st.identify_traits(i)
                            } else {
                                json!({ "firstName": st.first(i) })
                            };
                            payloads::segment_identify(&next_id(), None, Some(&st.user_id(i)), traits, None, now)
                        } else {
                            let (_, programme) = PROGRAMMES[rng.gen_range(0..PROGRAMMES.len())];
                            let props = json!({ "programme": programme, "screen": "Home", "session_length_s": rng.gen_range(5..900) });
                            payloads::segment_track(&next_id(), &st.user_id(i), pick(rng, APP_TRACKS), props, now)
                        };
                        v["context"]["device"] = json!({ "id": st.device_id(i), "manufacturer": "Google", "model": "Pixel 8", "type": "android" });
                        v["context"]["app"] = json!({ "name": "Campus", "version": "4.2.0", "build": "420" });
                        v["context"]["os"] = json!({ "name": "Android", "version": "14" });
                        v
                    } else if r < 0.06 && st.identified(i) {
                        user_ids.push(i);
                        let anon = st.anonymous_id(i);
                        payloads::segment_identify(
                            &next_id(),
                            Some(&anon),
                            Some(&st.user_id(i)),
                            st.identify_traits(i),
                            None,
                            now,
                        )
                    } else if r < 0.20 {
                        user_ids.push(i);
                        let (_, programme) = PROGRAMMES[rng.gen_range(0..PROGRAMMES.len())];
                        let mut v = payloads::segment_track(
                            &next_id(),
                            &st.user_id(i),
                            pick(rng, WEB_TRACKS),
                            json!({ "programme": programme }),
                            now,
                        );
                        v["anonymousId"] = json!(st.anonymous_id(i));
                        v
                    } else {
                        let path = if rng.gen_bool(0.6) {
                            PROGRAMMES[rng.gen_range(0..PROGRAMMES.len())].0
                        } else {
                            pick(rng, WEB_PAGES)
                        };
                        let mut v = payloads::segment_page(&next_id(), &st.anonymous_id(i), path, now);
                        // Logged-in visitors carry their userId on page views too.
                        if rng.gen_bool(0.5) {
                            user_ids.push(i);
                            v["userId"] = json!(st.user_id(i));
                        }
                        v
                    };
                    items.push(item);
                }
                let body = serde_json::to_vec(&payloads::segment_batch(items))?;
                let (kind, auth) = if mobile {
                    (Kind::MobileBatch, &self.creds.mobile_basic)
                } else {
                    (Kind::WebBatch, &self.creds.web_basic)
                };
                Ok(Built {
                    kind,
                    url: format!("{}/v1/batch", self.base),
                    auth: Some(auth.clone()),
                    content_type: "application/json",
                    extra_header: None,
                    body,
                    events,
                    user_ids,
                })
            }
            Unit::Single { index } => {
                let i = st.pick(rng);
                match index % 3 {
                    0 => {
                        let replay = self.replay_base + index;
                        let status = pick(rng, ENROLLMENT_STATUSES);
                        let (change, fields) = if rng.gen_bool(0.3) {
                            let (country, city, _) = st.country(i);
                            let fields = json!({
                                "Name": { "FirstName": st.first(i), "LastName": st.last(i) },
                                "Email": st.email(i),
                                "Phone": st.phone(i),
                                "MailingAddress": { "City": city, "Country": country },
                                "Enrollment_Status__c": status,
                            });
                            ("CREATE", fields)
                        } else {
                            ("UPDATE", json!({ "Enrollment_Status__c": status, "Email": st.email(i) }))
                        };
                        let body = payloads::salesforce_contact_cdc(replay, &st.salesforce_id(i), change, fields, now);
                        Ok(Built {
                            kind: Kind::SalesforceCdc,
                            url: format!("{}/webhooks/salesforce/cdc", self.base),
                            auth: Some(self.creds.crm_bearer.clone()),
                            content_type: "application/json",
                            extra_header: None,
                            body: serde_json::to_vec(&body)?,
                            events: 1,
                            user_ids: Vec::new(),
                        })
                    }
                    1 => {
                        let event = pick(rng, SENDGRID_EVENTS);
                        let mut body = payloads::sendgrid_event(&next_id(), &st.email(i), event, now);
                        if event == "click" {
                            body[0]["url"] = json!("https://www.example-university.eu/admissions/apply");
                        }
                        Ok(Built {
                            kind: Kind::Sendgrid,
                            url: format!("{}/webhooks/sendgrid/events", self.base),
                            // Unsigned: the API token (every scope) stands in for a signature.
                            auth: Some(self.creds.api_bearer.clone()),
                            content_type: "application/json",
                            extra_header: None,
                            body: serde_json::to_vec(&body)?,
                            events: 1,
                            user_ids: Vec::new(),
                        })
                    }
                    _ => {
                        // `x` keeps worker and sequence apart: "w3x12" and "w31x2" must differ.
                        let sid = format!("SM{}", next_id().replace('-', "x"));
                        let form =
                            payloads::twilio_whatsapp_form(&sid, &st.phone(i), pick(rng, WHATSAPP_TEXTS), st.first(i));
                        let signature = sign_twilio(&self.creds.twilio_token, &self.creds.twilio_url, &form);
                        let body = serde_urlencoded::to_string(&form).context("encoding the Twilio form")?;
                        Ok(Built {
                            kind: Kind::Whatsapp,
                            url: format!("{}/webhooks/twilio/whatsapp", self.base),
                            auth: None,
                            content_type: "application/x-www-form-urlencoded",
                            extra_header: Some(("x-twilio-signature", signature)),
                            body: body.into_bytes(),
                            events: 1,
                            user_ids: Vec::new(),
                        })
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Phase 1: ingest

/// Per-kind counters of one worker, merged at the end (no shared locks on the hot path).
#[derive(Debug, Default, Clone)]
struct KindStats {
    requests: u64,
    events: u64,
    accepted: u64,
    duplicates: u64,
    rejected: u64,
    http_errors: BTreeMap<u16, u64>,
    transport_errors: u64,
    first_error: Option<String>,
    latencies_us: Vec<u64>,
}

impl KindStats {
    fn merge(&mut self, other: KindStats) {
        self.requests += other.requests;
        self.events += other.events;
        self.accepted += other.accepted;
        self.duplicates += other.duplicates;
        self.rejected += other.rejected;
        for (k, v) in other.http_errors {
            *self.http_errors.entry(k).or_default() += v;
        }
        self.transport_errors += other.transport_errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.latencies_us.extend(other.latencies_us);
    }
    fn errors(&self) -> u64 {
        self.http_errors.values().sum::<u64>() + self.transport_errors
    }
}

fn count_field(v: &Value) -> u64 {
    v.as_u64().or_else(|| v.as_array().map(|a| a.len() as u64)).unwrap_or(0)
}

async fn ingest_worker(ctx: Arc<IngestCtx>) -> anyhow::Result<Vec<KindStats>> {
    let mut stats: Vec<KindStats> = Kind::ALL.iter().map(|_| KindStats::default()).collect();
    loop {
        let j = ctx.next_unit.fetch_add(1, Ordering::Relaxed);
        if j >= ctx.plan.units {
            break;
        }
        if let Some(spu) = ctx.seconds_per_unit {
            let due = ctx.started + Duration::from_secs_f64(spu * j as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let built = ctx.traffic.take(j).ok_or_else(|| anyhow!("request {j} of phase 1 was not prepared"))?;
        let s = &mut stats[built.kind.index()];
        s.requests += 1;
        s.events += built.events;
        let mut req = ctx.http.post(&built.url).header(CONTENT_TYPE, built.content_type).body(built.body);
        if let Some(a) = &built.auth {
            req = req.header(AUTHORIZATION, a);
        }
        if let Some((k, v)) = &built.extra_header {
            req = req.header(*k, v);
        }
        let sent = Instant::now();
        let outcome = match req.send().await {
            Ok(resp) => {
                let status = resp.status();
                resp.bytes().await.map(|b| (status, b))
            }
            Err(e) => Err(e),
        };
        s.latencies_us.push(sent.elapsed().as_micros() as u64);
        match outcome {
            Ok((status, body)) if status.is_success() => {
                let (accepted, duplicates, rejected) = if built.kind == Kind::Whatsapp {
                    // Twilio gets empty TwiML back: a 200 means the message was made durable.
                    (built.events, 0, 0)
                } else {
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    (count_field(&v["accepted"]), count_field(&v["duplicates"]), count_field(&v["rejected"]))
                };
                s.accepted += accepted;
                s.duplicates += duplicates;
                s.rejected += rejected;
                if rejected > 0 && s.first_error.is_none() {
                    s.first_error = Some(format!("HTTP {status} with rejections: {}", String::from_utf8_lossy(&body)));
                }
                ctx.accepted_events.fetch_add(accepted, Ordering::Relaxed);
                if accepted > 0 {
                    for i in built.user_ids {
                        if let Some(flag) = ctx.known.get(i as usize) {
                            flag.store(true, Ordering::Relaxed);
                        }
                    }
                }
            }
            Ok((status, body)) => {
                *s.http_errors.entry(status.as_u16()).or_default() += 1;
                if s.first_error.is_none() {
                    let text: String = String::from_utf8_lossy(&body).chars().take(300).collect();
                    s.first_error = Some(format!("HTTP {status}: {text}"));
                }
            }
            Err(e) => {
                s.transport_errors += 1;
                if s.first_error.is_none() {
                    s.first_error = Some(format!("transport: {e}"));
                }
            }
        }
        ctx.answered_events.fetch_add(built.events, Ordering::Relaxed);
    }
    Ok(stats)
}

#[derive(Debug, Clone)]
struct IngestResult {
    by_kind: Vec<(Kind, KindStats)>,
    total: KindStats,
    /// Accepted events the pipeline must apply: the answers' sum, capped by the server counter.
    expected: u64,
    /// Request bodies rendered before the clock, and how long that took (not in any figure).
    prepared_bytes: usize,
    prepared_in: Duration,
    http_elapsed: Duration,
    applied_elapsed: Duration,
    all_applied: bool,
    applied: u64,
    e2p: HistogramDelta,
    /// Time since receipt at each stage before the profile (`cohort_pipeline_stage_seconds`).
    stages: Vec<(&'static str, HistogramDelta)>,
    server: ServerDeltas,
}

/// What the server's counters moved by during the phase.
#[derive(Debug, Clone, Default)]
struct ServerDeltas {
    accepted: f64,
    duplicates: f64,
    rejected: f64,
    dead_letters_pipeline: f64,
    dead_letters_validation: f64,
    profiles_created: f64,
    identity_merges: f64,
    actor_restarts: f64,
    flushes: f64,
    flush_seconds_mean: Option<f64>,
    /// Profile records those flushes wrote (each a whole record, history included).
    profiles_written: f64,
}

impl ServerDeltas {
    fn between(before: &Scrape, after: &Scrape) -> Self {
        let d = |name: &str, filter: &[(&str, &str)]| after.sum(name, filter) - before.sum(name, filter);
        let flushes = d("cohort_profile_flush_seconds_count", &[]);
        let flush_sum = d("cohort_profile_flush_seconds_sum", &[]);
        ServerDeltas {
            accepted: d("cohort_ingest_events_accepted_total", &[]),
            duplicates: d("cohort_ingest_events_duplicate_total", &[]),
            rejected: d("cohort_ingest_events_rejected_total", &[]),
            dead_letters_pipeline: d("cohort_dead_letters_total", &[])
                - d("cohort_dead_letters_total", &[("stage", "validation")]),
            dead_letters_validation: d("cohort_dead_letters_total", &[("stage", "validation")]),
            profiles_created: d("cohort_profiles_created_total", &[]),
            identity_merges: d("cohort_identity_merges_total", &[]),
            actor_restarts: d("cohort_actor_restarts_total", &[]),
            flushes,
            profiles_written: d("cohort_profile_flush_profiles_written_total", &[]),
            flush_seconds_mean: (flushes > 0.0).then(|| flush_sum / flushes),
        }
    }
}

/// Events that left the pipeline since `before`: applied on a profile, or dead-lettered after
/// acceptance (an event the pipeline gave up on will never be applied, so waiting is futile).
fn settled_since(before: &Scrape, now: &Scrape) -> u64 {
    let applied = now.sum("cohort_event_to_profile_seconds_count", &[])
        - before.sum("cohort_event_to_profile_seconds_count", &[]);
    let dead = |s: &Scrape| {
        s.sum("cohort_dead_letters_total", &[]) - s.sum("cohort_dead_letters_total", &[("stage", "validation")])
    };
    (applied + dead(now) - dead(before)).max(0.0) as u64
}

async fn run_ingest(
    http: &reqwest::Client,
    base: &str,
    creds: &Creds,
    students: &Students,
    traffic: Traffic,
    s: &Settings,
) -> anyhow::Result<(IngestResult, Vec<u32>)> {
    let plan = Plan::new(s);
    let before = scrape(http, base, creds).await.context("reading /metrics before the ingest phase")?;
    let (prepared_bytes, prepared_in) = (traffic.bytes, traffic.rendered_in);
    let started = Instant::now();
    let ctx = Arc::new(IngestCtx {
        http: http.clone(),
        traffic,
        plan,
        next_unit: AtomicU64::new(0),
        known: (0..students.n).map(|_| AtomicBool::new(false)).collect(),
        answered_events: AtomicU64::new(0),
        accepted_events: AtomicU64::new(0),
        started,
        seconds_per_unit: s.ingest_rate.map(|rate| (s.events as f64 / plan.units as f64) / rate),
    });
    let progress = (!s.quiet).then(|| {
        let ctx = ctx.clone();
        let total = s.events;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!(
                    "[ingest] {:>5.1} s  {} / {} events answered, {} accepted",
                    ctx.started.elapsed().as_secs_f64(),
                    thousands(ctx.answered_events.load(Ordering::Relaxed)),
                    thousands(total),
                    thousands(ctx.accepted_events.load(Ordering::Relaxed)),
                );
            }
        })
    });
    let workers: Vec<_> = (0..s.concurrency).map(|_| tokio::spawn(ingest_worker(ctx.clone()))).collect();
    let mut per_kind: Vec<KindStats> = Kind::ALL.iter().map(|_| KindStats::default()).collect();
    let mut failure = None;
    for w in workers {
        match w.await {
            Ok(Ok(stats)) => {
                for (acc, st) in per_kind.iter_mut().zip(stats) {
                    acc.merge(st);
                }
            }
            Ok(Err(e)) => failure = Some(e),
            Err(e) => failure = Some(anyhow!("ingest worker panicked: {e}")),
        }
    }
    if let Some(p) = &progress {
        p.abort();
    }
    if let Some(e) = failure {
        return Err(e.context("building or sending ingest traffic"));
    }
    let http_elapsed = started.elapsed();
    let mut total = KindStats::default();
    for st in &per_kind {
        total.merge(st.clone());
    }

    // Wait until every accepted event has reached its profile. A Twilio 200 carries no count,
    // so the server's own counter (final once every answer is in) caps what the answers claim;
    // the cap never lets another client's traffic on a shared server inflate the target.
    let mid = scrape(http, base, creds).await.context("reading /metrics after the last ingest answer")?;
    let server_accepted =
        mid.sum("cohort_ingest_events_accepted_total", &[]) - before.sum("cohort_ingest_events_accepted_total", &[]);
    let expected = total.accepted.min(server_accepted.max(0.0) as u64);
    let deadline = Instant::now() + s.settle_timeout;
    let mut last_print = Instant::now();
    let (after, applied_elapsed, all_applied, applied) = loop {
        let now = scrape(http, base, creds).await.context("reading /metrics while waiting for profiles")?;
        let settled = settled_since(&before, &now);
        let elapsed = started.elapsed();
        if settled >= expected {
            break (now, elapsed, true, settled);
        }
        if Instant::now() > deadline {
            break (now, elapsed, false, settled);
        }
        if !s.quiet && last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            eprintln!(
                "[apply]  {:>5.1} s  {} / {} accepted events applied to profiles",
                elapsed.as_secs_f64(),
                thousands(settled),
                thousands(expected)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let e2p = HistogramDelta::between(&before, &after, "cohort_event_to_profile_seconds", &[]);
    let stages = cohort_supervisors::PIPELINE_STAGES
        .iter()
        .map(|&stage| {
            (stage, HistogramDelta::between(&before, &after, "cohort_pipeline_stage_seconds", &[("stage", stage)]))
        })
        .collect();
    let server = ServerDeltas::between(&before, &after);
    let known: Vec<u32> =
        ctx.known.iter().enumerate().filter(|(_, f)| f.load(Ordering::Relaxed)).map(|(i, _)| i as u32).collect();
    let by_kind = Kind::ALL.iter().copied().zip(per_kind).collect();
    let result = IngestResult {
        by_kind,
        total,
        expected,
        prepared_bytes,
        prepared_in,
        http_elapsed,
        applied_elapsed,
        all_applied,
        applied,
        e2p,
        stages,
        server,
    };
    Ok((result, known))
}

// ---------------------------------------------------------------------------------------------
// Phase 2: Profile API under a fixed offered rate

#[derive(Debug, Clone, Default)]
struct ProfileResult {
    scheduled: u64,
    ok: u64,
    not_found: u64,
    http_errors: BTreeMap<u16, u64>,
    transport_errors: u64,
    first_error: Option<String>,
    window: Duration,
    /// From the scheduled send time to the full response (corrects coordinated omission).
    latency_us: Vec<u64>,
    /// From the actual send to the full response (what the server and network took).
    service_us: Vec<u64>,
    /// Latencies by the second of the schedule they belong to: tells a stall from a steady state.
    per_second_us: Vec<Vec<u64>>,
    server: HistogramDelta,
    /// In-process runs: CPU time of this process (Cohort and the client) over phase 2.
    cpu_seconds: Option<f64>,
}

impl ProfileResult {
    fn errors(&self) -> u64 {
        self.http_errors.values().sum::<u64>() + self.transport_errors
    }
    /// CPU per answered or failed request, client included (the whole phase: also what else
    /// the process did meanwhile).
    fn cpu_us_per_request(&self) -> Option<f64> {
        let n = self.latency_us.len();
        self.cpu_seconds.filter(|_| n > 0).map(|c| c * 1e6 / n as f64)
    }

    /// Cores busy on average over the phase.
    fn cores_used(&self) -> Option<f64> {
        self.cpu_seconds.filter(|_| !self.window.is_zero()).map(|c| c / self.window.as_secs_f64())
    }

    fn achieved_rps(&self) -> f64 {
        if self.window.is_zero() {
            0.0
        } else {
            self.ok as f64 / self.window.as_secs_f64()
        }
    }
}

enum ProfileOutcome {
    Ok,
    Status(u16, String),
    Transport(String),
}

/// Sends one Profile API request; `scheduled` is when the open-loop schedule wanted it sent.
/// It first waits for its turn among the requests in flight (`slots`), and that wait counts.
async fn profile_request(
    http: reqwest::Client,
    slots: Arc<tokio::sync::Semaphore>,
    url: reqwest::Url,
    auth: Arc<str>,
    scheduled: Instant,
    second: usize,
    tx: mpsc::UnboundedSender<(u64, u64, ProfileOutcome, Instant, usize)>,
) {
    // Unbounded concurrency would open a connection per request whenever the server slows
    // down; the connects then starve the server of CPU and the run collapses into transport
    // errors (measured: half of phase 2's CPU in the kernel's ephemeral-port search).
    let Ok(_slot) = slots.acquire_owned().await else { return };
    let sent = Instant::now();
    let outcome = match http.get(url).header(AUTHORIZATION, &*auth).send().await {
        Ok(resp) => {
            let status = resp.status();
            match resp.bytes().await {
                Ok(_) if status.is_success() => ProfileOutcome::Ok,
                Ok(body) => {
                    ProfileOutcome::Status(status.as_u16(), String::from_utf8_lossy(&body).chars().take(300).collect())
                }
                Err(e) => ProfileOutcome::Transport(e.to_string()),
            }
        }
        Err(e) => ProfileOutcome::Transport(e.to_string()),
    };
    let done = Instant::now();
    let latency = done.saturating_duration_since(scheduled).as_micros() as u64;
    let service = done.saturating_duration_since(sent).as_micros() as u64;
    let _ = tx.send((latency, service, outcome, done, second));
}

async fn run_profiles(
    http: &reqwest::Client,
    base: &str,
    creds: &Creds,
    students: &Students,
    known: &[u32],
    s: &Settings,
    in_process: bool,
) -> anyhow::Result<ProfileResult> {
    if known.is_empty() {
        bail!("no student's userId was accepted in phase 1, so the Profile API has nothing to look up");
    }
    // Parsed once: the client would parse a string URL on every request.
    let urls: Vec<reqwest::Url> = known
        .iter()
        .map(|&i| reqwest::Url::parse(&format!("{base}/v1/profiles/user_id:{}", students.user_id(i))))
        .collect::<Result<_, _>>()
        .context("building the Profile API URLs")?;
    let urls = Arc::new(urls);
    let auth: Arc<str> = Arc::from(creds.api_bearer.as_str());

    // Warm-up, not measured: opens the client's connections the way a steady client already
    // has them.
    let warm: Vec<_> = (0..s.profile_concurrency)
        .map(|k| {
            let (http, url, auth) = (http.clone(), urls[k % urls.len()].clone(), auth.clone());
            tokio::spawn(async move {
                if let Ok(r) = http.get(url).header(AUTHORIZATION, &*auth).send().await {
                    let _ = r.bytes().await;
                }
            })
        })
        .collect();
    for w in warm {
        let _ = w.await;
    }

    let before = scrape(http, base, creds).await.context("reading /metrics before the Profile API phase")?;
    // After the warm-up and the scrape: the CPU of the measured requests (and of whatever else
    // the process does meanwhile).
    let cpu_before = if in_process { process_usage() } else { None };
    let total = ((s.profile_rps as f64) * s.profile_seconds).round() as u64;
    let interval_ns = 1e9 / s.profile_rps as f64;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let start = Instant::now() + Duration::from_millis(5);
    let handle = tokio::runtime::Handle::current();
    let slots = Arc::new(tokio::sync::Semaphore::new(s.profile_concurrency));
    let (http2, urls2, seed) = (http.clone(), urls.clone(), s.seed);
    // The schedule runs on its own OS thread: std sleeps are precise to tens of microseconds,
    // where tokio's timer wheel has 1 ms ticks, which would add up to 1 ms of harness latency.
    let scheduler = tokio::task::spawn_blocking(move || {
        let mut rng = StdRng::seed_from_u64(mix(seed ^ 0x5052_4F46));
        for k in 0..total {
            let offset = Duration::from_nanos((k as f64 * interval_ns) as u64);
            let scheduled = start + offset;
            let now = Instant::now();
            if scheduled > now {
                std::thread::sleep(scheduled - now);
            }
            let url = urls2[rng.gen_range(0..urls2.len())].clone();
            let second = offset.as_secs() as usize;
            handle.spawn(profile_request(
                http2.clone(),
                slots.clone(),
                url,
                auth.clone(),
                scheduled,
                second,
                tx.clone(),
            ));
        }
    });
    let mut result = ProfileResult { scheduled: total, ..ProfileResult::default() };
    let mut last_done = start;
    let mut last_print = Instant::now();
    let collect = async {
        while let Some((latency, service, outcome, done, second)) = rx.recv().await {
            if result.per_second_us.len() <= second {
                result.per_second_us.resize_with(second + 1, Vec::new);
            }
            result.per_second_us[second].push(latency);
            result.latency_us.push(latency);
            result.service_us.push(service);
            last_done = last_done.max(done);
            match outcome {
                ProfileOutcome::Ok => result.ok += 1,
                ProfileOutcome::Status(code, body) => {
                    if code == 404 {
                        result.not_found += 1;
                    }
                    *result.http_errors.entry(code).or_default() += 1;
                    result.first_error.get_or_insert_with(|| format!("HTTP {code}: {body}"));
                }
                ProfileOutcome::Transport(e) => {
                    result.transport_errors += 1;
                    result.first_error.get_or_insert_with(|| format!("transport: {e}"));
                }
            }
            if !s.quiet && last_print.elapsed() >= Duration::from_secs(1) {
                last_print = Instant::now();
                eprintln!(
                    "[profile] {:>4.1} s  {} / {} requests answered",
                    start.elapsed().as_secs_f64(),
                    thousands(result.latency_us.len() as u64),
                    thousands(total)
                );
            }
        }
    };
    let (sched, ()) = tokio::join!(scheduler, collect);
    sched.context("the Profile API scheduler thread failed")?;
    result.window = last_done.saturating_duration_since(start);
    if let (Some((_, before)), Some((_, after))) = (cpu_before, cpu_before.and_then(|_| process_usage())) {
        result.cpu_seconds = Some(after - before);
    }
    let after = scrape(http, base, creds).await.context("reading /metrics after the Profile API phase")?;
    result.server = HistogramDelta::between(
        &before,
        &after,
        "cohort_api_request_duration_seconds",
        &[("route", "/v1/profiles/{ref}"), ("method", "GET")],
    );
    Ok(result)
}

// ---------------------------------------------------------------------------------------------
// Prometheus text format

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// One scrape of `/metrics`.
#[derive(Debug, Clone, Default)]
struct Scrape {
    samples: Vec<Sample>,
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        other => other.parse().ok(),
    }
}

/// Label pairs after `{`; returns them and the rest after `}`. Label values may hold `{`, `}`
/// and `,` (route templates do), so this reads quoted strings rather than splitting.
fn parse_labels(s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        if let Some(r) = rest.strip_prefix('}') {
            return Some((labels, r));
        }
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_string();
        rest = rest[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => {
                    let (_, e) = chars.next()?;
                    value.push(if e == 'n' { '\n' } else { e });
                }
                '"' => break i,
                other => value.push(other),
            }
        };
        rest = &rest[end + 1..];
        labels.push((key, value));
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_string();
    let rest = &line[name_end..];
    let (labels, rest) = match rest.strip_prefix('{') {
        Some(r) => parse_labels(r)?,
        None => (Vec::new(), rest),
    };
    let value = parse_value(rest.split_whitespace().next()?)?;
    Some(Sample { name, labels, value })
}

impl Scrape {
    fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(parse_sample)
            .collect();
        Scrape { samples }
    }

    fn matching<'a>(&'a self, name: &'a str, filter: &'a [(&str, &str)]) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name && filter.iter().all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
    }

    /// Sum over every label set matching `filter`.
    fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.matching(name, filter).map(|s| s.value).sum()
    }

    /// Cumulative buckets `(le, count)` summed over label sets, sorted by `le`.
    fn buckets(&self, base: &str, filter: &[(&str, &str)]) -> Vec<(f64, f64)> {
        let name = format!("{base}_bucket");
        let mut by_le: Vec<(f64, f64)> = Vec::new();
        for s in self.matching(&name, filter) {
            let Some(le) = s.labels.iter().find(|(k, _)| k == "le").and_then(|(_, v)| parse_value(v)) else {
                continue;
            };
            match by_le.iter_mut().find(|(l, _)| *l == le) {
                Some(entry) => entry.1 += s.value,
                None => by_le.push((le, s.value)),
            }
        }
        by_le.sort_by(|a, b| a.0.total_cmp(&b.0));
        by_le
    }
}

async fn scrape(http: &reqwest::Client, base: &str, creds: &Creds) -> anyhow::Result<Scrape> {
    let resp = http.get(format!("{base}/metrics")).header("authorization", &creds.api_bearer).send().await?;
    if !resp.status().is_success() {
        bail!("GET /metrics answered {}", resp.status());
    }
    Ok(Scrape::parse(&resp.text().await?))
}

/// A histogram's growth between two scrapes: what happened during one phase only.
#[derive(Debug, Clone, Default)]
struct HistogramDelta {
    buckets: Vec<(f64, f64)>,
    count: f64,
    sum: f64,
}

impl HistogramDelta {
    fn between(before: &Scrape, after: &Scrape, base: &str, filter: &[(&str, &str)]) -> Self {
        let old = before.buckets(base, filter);
        let buckets = after
            .buckets(base, filter)
            .into_iter()
            .map(|(le, c)| (le, c - old.iter().find(|(l, _)| *l == le).map_or(0.0, |(_, o)| *o)))
            .collect();
        let d = |suffix: &str| {
            let name = format!("{base}_{suffix}");
            after.sum(&name, filter) - before.sum(&name, filter)
        };
        HistogramDelta { buckets, count: d("count"), sum: d("sum") }
    }

    /// Prometheus-style `histogram_quantile`: linear interpolation inside the bucket holding
    /// the rank. The flag is true when the rank falls in `+Inf` (the value is a lower bound).
    fn quantile(&self, q: f64) -> Option<(f64, bool)> {
        let total = self.buckets.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let (mut prev_le, mut prev_cum) = (0.0, 0.0);
        for &(le, cum) in &self.buckets {
            if cum >= rank {
                if le.is_infinite() {
                    return Some((prev_le, true));
                }
                if cum <= prev_cum {
                    return Some((le, false));
                }
                return Some((prev_le + (le - prev_le) * (rank - prev_cum) / (cum - prev_cum), false));
            }
            (prev_le, prev_cum) = (le, cum);
        }
        None
    }

    /// The exact share of observations at or below a bucket boundary.
    fn share_within(&self, le: f64) -> Option<f64> {
        let total = self.buckets.last()?.1;
        let at = self.buckets.iter().find(|(l, _)| (*l - le).abs() < 1e-12)?.1;
        (total > 0.0).then(|| at / total)
    }

    fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }

    /// The quantile in milliseconds for a report, `> x` when only a lower bound is known.
    fn quantile_ms(&self, p: f64) -> Option<String> {
        self.quantile(p).map(|(v, open)| if open { format!("> {:.1}", v * 1e3) } else { format!("{:.2}", v * 1e3) })
    }

    fn to_json_ms(&self) -> Value {
        let q = |p: f64| self.quantile(p).map(|(v, open)| json!({ "ms": v * 1e3, "lower_bound_only": open }));
        json!({
            "method": "bucket-interpolated from the Prometheus histogram (delta over the phase, linear within buckets)",
            "observations": self.count,
            "p50": q(0.50),
            "p99": q(0.99),
            "mean_ms": self.mean().map(|m| m * 1e3),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Reporting

fn percentile_us(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((q * sorted.len() as f64).ceil() as usize).saturating_sub(1).min(sorted.len() - 1);
    Some(sorted[idx])
}

/// p50 / p99 / max in milliseconds from microsecond samples.
fn latency_summary(samples: &[u64]) -> Option<(f64, f64, f64)> {
    let mut v = samples.to_vec();
    v.sort_unstable();
    let ms = |us: u64| us as f64 / 1e3;
    Some((ms(percentile_us(&v, 0.50)?), ms(percentile_us(&v, 0.99)?), ms(*v.last()?)))
}

fn latency_json(samples: &[u64]) -> Value {
    match latency_summary(samples) {
        Some((p50, p99, max)) => json!({ "samples": samples.len(), "p50_ms": p50, "p99_ms": p99, "max_ms": max }),
        None => json!({ "samples": 0 }),
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.2} ms"))
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One target of the issue and how this run did against it.
#[derive(Debug, Clone)]
struct TargetCheck {
    name: &'static str,
    target: String,
    measured: String,
    value: Option<f64>,
    pass: bool,
    /// False when the run's settings differ from the target's conditions (e.g. --quick).
    comparable: bool,
}

fn machine() -> Value {
    let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    // Other work on the machine skews every figure; the load average shows whether there was any.
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let loadavg: Vec<f64> = loadavg.split_whitespace().take(3).filter_map(|v| v.parse().ok()).collect();
    json!({
        "nproc": nproc,
        "cpu_model": model,
        "memory_gib": mem_kib.map(|k| (k as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0),
        "kernel": kernel,
        "loadavg_1_5_15": loadavg,
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
    })
}

struct Report<'a> {
    mode: &'a str,
    base: &'a str,
    settings: &'a Settings,
    plan: Plan,
    run: &'a str,
    machine: Value,
    ingest: &'a IngestResult,
    profile: Option<&'a ProfileResult>,
    profile_skipped: Option<String>,
    /// In-process runs: memory and CPU of this process (Cohort and the generator) over phase 1.
    capacity: Option<Capacity>,
    /// Runs with a warehouse: relaying phase 1's outbox after its profiles settled.
    warehouse_tail: Option<WarehouseTail>,
}

/// The warehouse relay that runs after the last event reached its profile.
#[derive(Debug, Clone, Copy)]
struct WarehouseTail {
    took: Duration,
    /// Outbox entries waiting when the profiles had settled (the sink's own timer may relay
    /// some of them, so they are counted here rather than from the relays asked for); with
    /// `--url`, the most the server's outbox gauge showed meanwhile.
    waiting: u64,
    /// In-process: how long after the relay the process kept working (the DuckDB file is
    /// closed, and its write-ahead log checkpointed, right after the last relay), and whether it
    /// went quiet within the limit.
    quiet: Option<Quiet>,
}

#[derive(Debug, Clone, Copy)]
struct Quiet {
    after: Duration,
    reached: bool,
}

/// Waits until this process uses less than a quarter of a core for two consecutive 200 ms
/// windows (at most `limit`), so phase 2 does not share the cores with phase 1's last
/// background work. `None` where the process CPU cannot be read.
async fn wait_until_quiet(limit: Duration) -> Option<Quiet> {
    const WINDOW: Duration = Duration::from_millis(200);
    let started = Instant::now();
    let mut last = process_usage()?.1;
    let mut calm = 0;
    while started.elapsed() < limit {
        tokio::time::sleep(WINDOW).await;
        let now = process_usage()?.1;
        calm = if now - last < 0.25 * WINDOW.as_secs_f64() { calm + 1 } else { 0 };
        last = now;
        if calm == 2 {
            return Some(Quiet { after: started.elapsed(), reached: true });
        }
    }
    Some(Quiet { after: started.elapsed(), reached: false })
}

/// Silver rows written, per the server's counters (one per applied event).
const SILVER_ROWS: &str = "cohort_warehouse_rows_written_total";

/// A running Cohort (`--url`): waits until its warehouse has written a Silver row for every
/// event phase 1 applied. (The outbox gauge is only refreshed at the end of a relay, so it
/// reads empty while a long relay is still running.) `None` when the server has no warehouse.
async fn wait_for_remote_warehouse(
    http: &reqwest::Client,
    base: &str,
    creds: &Creds,
    silver_before: f64,
    ingest: &IngestResult,
    timeout: Duration,
) -> anyhow::Result<Option<WarehouseTail>> {
    const GAUGE: &str = "cohort_warehouse_outbox_batches";
    let started = Instant::now();
    let expected = ingest.applied.min(ingest.expected) as f64;
    let mut waiting = 0_u64;
    loop {
        let metrics = scrape(http, base, creds).await.context("reading the warehouse counters")?;
        if !metrics.samples.iter().any(|s| s.name == GAUGE) {
            return Ok(None);
        }
        waiting = waiting.max(metrics.sum(GAUGE, &[]) as u64);
        let written = metrics.sum(SILVER_ROWS, &[("layer", "silver")]) - silver_before;
        if written >= expected {
            return Ok(Some(WarehouseTail { took: started.elapsed(), waiting, quiet: None }));
        }
        if started.elapsed() > timeout {
            bail!("{written} of {expected} Silver rows written after {:.0} s", timeout.as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Relays the outbox until it is empty; `None` when the in-process Cohort has no warehouse.
async fn drain_warehouse(cohort: &cohort::system::Cohort, timeout: Duration) -> anyhow::Result<Option<WarehouseTail>> {
    let started = Instant::now();
    let waiting = cohort.api.store.outbox_len().await?;
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        let relayed = tokio::time::timeout(left, cohort.relay_warehouse())
            .await
            .map_err(|_| anyhow::anyhow!("the warehouse relay did not finish within {:.0} s", timeout.as_secs_f64()))?;
        let Some(report) = relayed? else { return Ok(None) };
        let took = started.elapsed();
        if report.remaining == 0 {
            // A DuckDB file held across relays would close (and checkpoint) a relay interval
            // later, inside phase 2; close it now, as phase 1's last work.
            if let Some(warehouse) = &cohort.ctx.warehouse {
                warehouse.release().await;
            }
            let quiet = wait_until_quiet(Duration::from_secs(10)).await;
            return Ok(Some(WarehouseTail { took, waiting, quiet }));
        }
        if took > timeout {
            bail!("{} outbox entries still waiting after {:.1} s", report.remaining, took.as_secs_f64());
        }
    }
}

/// The figures a capacity model needs, from one in-process run.
#[derive(Debug, Clone)]
struct Capacity {
    rss_before: u64,
    rss_after: u64,
    live_profiles: f64,
    cpu_seconds: f64,
    applied: u64,
}

impl Capacity {
    /// Resident memory added per live ProfileActor: an upper bound (it includes the identity
    /// index, store caches and the load generator's own growth).
    fn bytes_per_live_profile(&self) -> Option<f64> {
        (self.live_profiles > 0.0).then(|| self.rss_after.saturating_sub(self.rss_before) as f64 / self.live_profiles)
    }

    /// Events applied per CPU-second used (Cohort and the generator together).
    fn events_per_cpu_second(&self) -> Option<f64> {
        (self.cpu_seconds > 0.0).then(|| self.applied as f64 / self.cpu_seconds)
    }

    fn to_json(&self) -> Value {
        json!({
            "rss_before_bytes": self.rss_before,
            "rss_after_bytes": self.rss_after,
            "live_profile_actors": self.live_profiles,
            "bytes_per_live_profile": self.bytes_per_live_profile(),
            "cpu_seconds": self.cpu_seconds,
            "events_per_cpu_second": self.events_per_cpu_second(),
        })
    }
}

/// This process's resident memory (bytes) and CPU time (user + system seconds), from Linux /proc.
fn process_usage() -> Option<(u64, f64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rss_kib: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name: state is field 3, utime 14 and stime 15 (in clock ticks,
    // 100 per second on Linux).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((rss_kib * 1024, ticks as f64 / 100.0))
}

/// Machine-wide CPU time from the first line of /proc/stat, in seconds: `busy` is what the
/// machine's processes used (user, nice, system, irq, softirq), `steal` what the hypervisor
/// took from this VM. Idle and I/O wait are left out.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct MachineCpu {
    busy: f64,
    steal: f64,
}

impl MachineCpu {
    fn read() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    fn parse(text: &str) -> Option<Self> {
        let ticks: Vec<u64> = text
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal ..., in ticks of 1/100 s.
        let at = |i: usize| ticks.get(i).copied().unwrap_or(0) as f64 / 100.0;
        Some(MachineCpu { busy: at(0) + at(1) + at(2) + at(5) + at(6), steal: at(7) })
    }
}

/// Who used the CPU during a phase: this process (Cohort in-process and the load generator, or
/// the raw broker harness) and everything else on the machine (in Kafka mode: the broker and
/// database stand-ins, which share the cores).
#[derive(Debug, Clone, Copy, PartialEq)]
struct CpuSplit {
    wall: f64,
    own: f64,
    others: f64,
    steal: f64,
}

/// Marks the start of a phase whose CPU split is wanted.
#[derive(Debug, Clone, Copy)]
struct CpuMark {
    at: Instant,
    own: f64,
    machine: MachineCpu,
}

impl CpuMark {
    fn now() -> Option<Self> {
        Some(CpuMark { at: Instant::now(), own: process_usage()?.1, machine: MachineCpu::read()? })
    }

    fn split(&self) -> Option<CpuSplit> {
        let end = CpuMark::now()?;
        Some(CpuSplit::between(self, &end))
    }
}

impl CpuSplit {
    fn between(start: &CpuMark, end: &CpuMark) -> Self {
        let own = (end.own - start.own).max(0.0);
        CpuSplit {
            wall: end.at.saturating_duration_since(start.at).as_secs_f64(),
            own,
            // Tick rounding can make this process's share exceed the machine's by a tick.
            others: (end.machine.busy - start.machine.busy - own).max(0.0),
            steal: (end.machine.steal - start.machine.steal).max(0.0),
        }
    }

    fn describe(&self) -> String {
        format!(
            "wall {:.1} s: this process {:.1} CPU-s, rest of the machine {:.1} CPU-s, stolen by the hypervisor {:.1} CPU-s",
            self.wall, self.own, self.others, self.steal
        )
    }

    fn to_json(self) -> Value {
        json!({ "wall_seconds": self.wall, "own_cpu_seconds": self.own, "others_cpu_seconds": self.others, "steal_cpu_seconds": self.steal })
    }
}

impl Report<'_> {
    fn e2e_events_per_sec(&self) -> f64 {
        let secs = self.ingest.applied_elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ingest.applied.min(self.ingest.expected) as f64 / secs
        } else {
            0.0
        }
    }

    fn targets(&self) -> Vec<TargetCheck> {
        let s = self.settings;
        let eps = self.e2e_events_per_sec();
        let mut out = vec![TargetCheck {
            name: "end-to-end throughput (accepted -> profile updated)",
            target: format!(">= {} events/s in batches of {TARGET_BATCH}", thousands(TARGET_EVENTS_PER_SEC as u64)),
            measured: format!("{} events/s", thousands(eps.round() as u64)),
            value: Some(eps),
            pass: self.ingest.all_applied && eps >= TARGET_EVENTS_PER_SEC && self.ingest.total.errors() == 0,
            comparable: !s.quick && s.batch == TARGET_BATCH && s.ingest_rate.is_none(),
        }];
        let p99 = self.ingest.e2p.quantile(0.99);
        out.push(TargetCheck {
            name: "event-to-profile p99 (server histogram, bucket-interpolated)",
            target: format!("< {TARGET_E2P_P99_MS} ms"),
            measured: match p99 {
                Some((v, true)) => format!("> {:.1} ms", v * 1e3),
                Some((v, false)) => format!("{:.2} ms", v * 1e3),
                None => "n/a".into(),
            },
            value: p99.map(|(v, _)| v * 1e3),
            pass: matches!(p99, Some((v, false)) if v * 1e3 < TARGET_E2P_P99_MS) && self.ingest.all_applied,
            comparable: !s.quick,
        });
        match self.profile {
            Some(p) => {
                let summary = latency_summary(&p.latency_us);
                let rps = p.achieved_rps();
                let p99 = summary.map(|(_, p99, _)| p99);
                out.push(TargetCheck {
                    name: "Profile API p99 at 5,000 requests/s (client, from scheduled send)",
                    target: format!("< {TARGET_PROFILE_P99_MS} ms at {} req/s", thousands(TARGET_PROFILE_RPS)),
                    measured: format!(
                        "{} at {} req/s, {} errors",
                        fmt_ms(p99),
                        thousands(rps.round() as u64),
                        p.errors()
                    ),
                    value: p99,
                    pass: p99.is_some_and(|v| v < TARGET_PROFILE_P99_MS)
                        && rps >= PROFILE_RPS_TOLERANCE * TARGET_PROFILE_RPS as f64
                        && p.errors() == 0,
                    comparable: !s.quick && s.profile_rps >= TARGET_PROFILE_RPS && s.profile_seconds >= 10.0,
                });
            }
            None => out.push(TargetCheck {
                name: "Profile API p99 at 5,000 requests/s (client, from scheduled send)",
                target: format!("< {TARGET_PROFILE_P99_MS} ms at {} req/s", thousands(TARGET_PROFILE_RPS)),
                measured: "not run".into(),
                value: None,
                pass: false,
                comparable: false,
            }),
        }
        out
    }

    fn kind_json(k: Kind, st: &KindStats) -> Value {
        json!({
            "kind": k.as_str(),
            "requests": st.requests,
            "events": st.events,
            "accepted": st.accepted,
            "duplicates": st.duplicates,
            "rejected": st.rejected,
            "http_errors": st.http_errors.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "transport_errors": st.transport_errors,
            "first_error": st.first_error,
            "request_latency": latency_json(&st.latencies_us),
        })
    }

    fn to_json(&self) -> Value {
        let s = self.settings;
        let i = self.ingest;
        let targets: Vec<Value> = self
            .targets()
            .iter()
            .map(|t| {
                json!({
                    "name": t.name,
                    "target": t.target,
                    "measured": t.measured,
                    "value": t.value,
                    "pass": t.pass,
                    "comparable": t.comparable,
                })
            })
            .collect();
        let profile = match self.profile {
            Some(p) => json!({
                "offered_rps": s.profile_rps,
                "seconds": s.profile_seconds,
                "scheduled_requests": p.scheduled,
                "ok": p.ok,
                "not_found": p.not_found,
                "errors": p.errors(),
                "http_errors": p.http_errors.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                "transport_errors": p.transport_errors,
                "first_error": p.first_error,
                "achieved_rps": p.achieved_rps(),
                "window_s": p.window.as_secs_f64(),
                "latency_from_scheduled_send": latency_json(&p.latency_us),
                "service_time_from_actual_send": latency_json(&p.service_us),
                "latency_per_second": p.per_second_us.iter().enumerate()
                    .map(|(sec, v)| json!({ "second": sec, "latency": latency_json(v) }))
                    .collect::<Vec<_>>(),
                "server_side": p.server.to_json_ms(),
                "server_share_within_5ms": p.server.share_within(0.005),
                "cpu_us_per_request": p.cpu_us_per_request(),
            }),
            None => json!({ "skipped": self.profile_skipped }),
        };
        let ingest = json!({
            "requests": i.total.requests,
            "events_sent": i.total.events,
            "accepted": i.total.accepted,
            "duplicates": i.total.duplicates,
            "rejected": i.total.rejected,
            "errors": i.total.errors(),
            "http_errors": i.total.http_errors.iter().map(|(k, v)| (k.to_string(), *v)).collect::<std::collections::BTreeMap<_, _>>(),
            "first_error": i.total.first_error,
            "prepared": { "body_bytes": i.prepared_bytes, "seconds": i.prepared_in.as_secs_f64() },
            "http_elapsed_s": i.http_elapsed.as_secs_f64(),
            "accepted_events_per_sec_http": i.total.accepted as f64 / i.http_elapsed.as_secs_f64().max(1e-9),
            "expected_to_apply": i.expected,
            "applied": i.applied,
            "all_applied": i.all_applied,
            "end_to_end_elapsed_s": i.applied_elapsed.as_secs_f64(),
            "end_to_end_events_per_sec": self.e2e_events_per_sec(),
            "request_latency": latency_json(&i.total.latencies_us),
            "by_kind": i.by_kind.iter().map(|(k, st)| Self::kind_json(*k, st)).collect::<Vec<_>>(),
            "event_to_profile": i.e2p.to_json_ms(),
            "event_to_profile_share_within_50ms": i.e2p.share_within(0.05),
            "stages": i.stages.iter().map(|(name, h)| (name.to_string(), h.to_json_ms())).collect::<serde_json::Map<_, _>>(),
            "server": {
                "accepted": i.server.accepted,
                "duplicates": i.server.duplicates,
                "rejected": i.server.rejected,
                "dead_letters_pipeline": i.server.dead_letters_pipeline,
                "dead_letters_validation": i.server.dead_letters_validation,
                "profiles_created": i.server.profiles_created,
                "identity_merges": i.server.identity_merges,
                "actor_restarts": i.server.actor_restarts,
                "flushes": i.server.flushes,
                "flush_mean_ms": i.server.flush_seconds_mean.map(|m| m * 1e3),
            },
        });
        json!({
            "tool": "cohort-bench",
            "version": env!("CARGO_PKG_VERSION"),
            "finished_at": Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
            "mode": self.mode,
            "url": self.base,
            "run_tag": self.run,
            "machine": self.machine,
            "config": {
                "students": s.students,
                "events": s.events,
                "batch": s.batch,
                "concurrency": s.concurrency,
                "other_share": s.other_share,
                "identified_share": s.identified_share,
                "ingest_rate": s.ingest_rate,
                "profile_rps": s.profile_rps,
                "profile_concurrency": s.profile_concurrency,
                "profile_seconds": s.profile_seconds,
                "settle_timeout_s": s.settle_timeout.as_secs(),
                "seed": s.seed,
                "quick": s.quick,
                "segment_batches": self.plan.batches,
                "single_calls": self.plan.singles,
            },
            "capacity": self.capacity.as_ref().map(Capacity::to_json),
            "warehouse_tail": self.warehouse_tail.map(|t| json!({
                "seconds": t.took.as_secs_f64(),
                "outbox_entries_waiting": t.waiting,
                "quiet_after_seconds": t.quiet.map(|q| q.after.as_secs_f64()),
                "quiet_reached": t.quiet.map(|q| q.reached),
            })),
            "ingest": ingest,
            "profile_api": profile,
            "targets": targets,
        })
    }

    fn print(&self) {
        let s = self.settings;
        let i = self.ingest;
        let m = &self.machine["at_start"];
        println!();
        println!("Cohort benchmark ({}, {})", self.mode, self.base);
        println!(
            "machine: {} cores, {}, {} GiB RAM",
            m["nproc"],
            m["cpu_model"].as_str().unwrap_or("unknown"),
            m["memory_gib"]
        );
        if self.mode == "in-process" {
            println!("note: the load generator shares these cores with Cohort");
        }
        if let Some(c) = &self.capacity {
            println!(
                "capacity: RSS {:.0} MiB before the load, {:.0} MiB after; {} live profile actors, {} per live profile (upper bound); {} events per CPU-second (Cohort and generator, ingest until profiles and warehouse settled)",
                c.rss_before as f64 / 1048576.0,
                c.rss_after as f64 / 1048576.0,
                thousands(c.live_profiles as u64),
                c.bytes_per_live_profile().map_or("?".into(), |b| format!("{:.1} KiB", b / 1024.0)),
                c.events_per_cpu_second().map_or("?".into(), |e| thousands(e as u64)),
            );
        }
        let load = |at: &str| self.machine[at]["loadavg_1_5_15"][0].as_f64().map_or("?".into(), |l| format!("{l:.2}"));
        println!("load average (1 min) at start {}, at end {}", load("at_start"), load("at_end"));
        println!(
            "config: {} students, {} events, batch {}, concurrency {}, {:.0}% single calls (CRM/email/WhatsApp){}",
            thousands(u64::from(s.students)),
            thousands(s.events),
            s.batch,
            s.concurrency,
            s.other_share * 100.0,
            if s.quick { ", QUICK smoke run" } else { "" }
        );
        println!();
        println!("Phase 1: ingest ({} requests)", thousands(i.total.requests));
        println!(
            "  {:<22} {:>8} {:>9} {:>9} {:>7} {:>10} {:>10}",
            "kind", "requests", "events", "accepted", "errors", "p50", "p99"
        );
        for (k, st) in &i.by_kind {
            if st.requests == 0 {
                continue;
            }
            let lat = latency_summary(&st.latencies_us);
            println!(
                "  {:<22} {:>8} {:>9} {:>9} {:>7} {:>10} {:>10}",
                k.as_str(),
                thousands(st.requests),
                thousands(st.events),
                thousands(st.accepted),
                st.errors(),
                fmt_ms(lat.map(|l| l.0)),
                fmt_ms(lat.map(|l| l.1)),
            );
        }
        let lat = latency_summary(&i.total.latencies_us);
        println!(
            "  {:<22} {:>8} {:>9} {:>9} {:>7} {:>10} {:>10}",
            "all",
            thousands(i.total.requests),
            thousands(i.total.events),
            thousands(i.total.accepted),
            i.total.errors(),
            fmt_ms(lat.map(|l| l.0)),
            fmt_ms(lat.map(|l| l.1)),
        );
        for (k, st) in &i.by_kind {
            if let Some(e) = &st.first_error {
                println!("  first problem ({}): {e}", k.as_str());
            }
        }
        println!(
            "  requests rendered first:   {} MiB of bodies in {:.2} s, before the clock and the CPU count",
            i.prepared_bytes >> 20,
            i.prepared_in.as_secs_f64()
        );
        println!(
            "  accepted over HTTP:        {} events in {:.2} s = {} events/s",
            thousands(i.total.accepted),
            i.http_elapsed.as_secs_f64(),
            thousands((i.total.accepted as f64 / i.http_elapsed.as_secs_f64().max(1e-9)).round() as u64)
        );
        println!(
            "  applied to profiles:       {} events in {:.2} s = {} events/s end to end{}",
            thousands(i.applied.min(i.expected)),
            i.applied_elapsed.as_secs_f64(),
            thousands(self.e2e_events_per_sec().round() as u64),
            if i.all_applied { "" } else { "  (NOT all applied before the timeout)" }
        );
        let q = |p: f64| i.e2p.quantile_ms(p).map_or_else(|| "n/a".into(), |v| format!("{v} ms"));
        println!(
            "  event-to-profile:          p50 {}, p99 {}, mean {} (bucket-interpolated from cohort_event_to_profile_seconds)",
            q(0.50),
            q(0.99),
            fmt_ms(i.e2p.mean().map(|v| v * 1e3))
        );
        if let Some(share) = i.e2p.share_within(0.05) {
            println!("  events applied within 50 ms: {:.2}% (exact, bucket boundary)", share * 100.0);
        }
        let stages: Vec<String> = i
            .stages
            .iter()
            .map(|(name, h)| {
                let ms = |v: Option<String>| v.unwrap_or_else(|| "n/a".into());
                let mean = h.mean().map(|m| format!("{:.2}", m * 1e3));
                format!("{name} {}/{}/{}", ms(h.quantile_ms(0.5)), ms(h.quantile_ms(0.99)), ms(mean))
            })
            .collect();
        println!("  since receipt, p50/p99/mean ms: {}", stages.join(", "));
        println!(
            "  server: {} profiles created, {} merges, {} dead letters after acceptance, {} restarts, {} flushes (mean {}) writing {} profile records",
            thousands(i.server.profiles_created as u64),
            thousands(i.server.identity_merges as u64),
            i.server.dead_letters_pipeline,
            i.server.actor_restarts,
            i.server.flushes,
            fmt_ms(i.server.flush_seconds_mean.map(|v| v * 1e3)),
            thousands(i.server.profiles_written as u64),
        );
        if let Some(t) = &self.warehouse_tail {
            let quiet = match t.quiet {
                Some(Quiet { after, reached: true }) => format!(", then quiet after {:.2} s", after.as_secs_f64()),
                Some(Quiet { after, reached: false }) => {
                    format!(", still busy {:.2} s later (phase 2 starts anyway)", after.as_secs_f64())
                }
                None => String::new(),
            };
            println!(
                "  warehouse tail: {} outbox entries waiting once the profiles settled, relayed in {:.2} s{quiet}; phase 2 starts after it",
                thousands(t.waiting),
                t.took.as_secs_f64()
            );
        }
        if (i.server.accepted - i.total.accepted as f64).abs() > 0.5 {
            println!(
                "  note: the server counted {} accepted events, the responses said {}",
                i.server.accepted, i.total.accepted
            );
        }
        println!();
        match self.profile {
            Some(p) => {
                println!(
                    "Phase 2: Profile API, open loop at {} req/s for {} s, at most {} in flight (GET /v1/profiles/user_id:...)",
                    thousands(s.profile_rps),
                    s.profile_seconds,
                    s.profile_concurrency
                );
                let lat = latency_summary(&p.latency_us);
                let svc = latency_summary(&p.service_us);
                println!(
                    "  {} scheduled, {} ok, {} errors ({} not found); achieved {} req/s",
                    thousands(p.scheduled),
                    thousands(p.ok),
                    p.errors(),
                    p.not_found,
                    thousands(p.achieved_rps().round() as u64)
                );
                println!(
                    "  latency from scheduled send: p50 {}, p99 {}, max {}",
                    fmt_ms(lat.map(|l| l.0)),
                    fmt_ms(lat.map(|l| l.1)),
                    fmt_ms(lat.map(|l| l.2))
                );
                println!(
                    "  service time from actual send: p50 {}, p99 {}, max {}",
                    fmt_ms(svc.map(|l| l.0)),
                    fmt_ms(svc.map(|l| l.1)),
                    fmt_ms(svc.map(|l| l.2))
                );
                let per_second: Vec<String> = p
                    .per_second_us
                    .iter()
                    .map(|v| latency_summary(v).map_or_else(|| "-".into(), |l| format!("{:.1}", l.1)))
                    .collect();
                println!("  p99 per second of the schedule (ms): {}", per_second.join(" "));
                let sq = |q: f64| p.server.quantile(q).map(|(v, _)| v * 1e3);
                println!(
                    "  server-side (api_request_duration_seconds, bucket-interpolated): p50 {}, p99 {}",
                    fmt_ms(sq(0.5)),
                    fmt_ms(sq(0.99))
                );
                if let (Some(us), Some(cores)) = (p.cpu_us_per_request(), p.cores_used()) {
                    println!(
                        "  CPU of Cohort and the client: {us:.0} us per request, {cores:.2} of {} cores",
                        m["nproc"]
                    );
                }
                if let Some(e) = &p.first_error {
                    println!("  first problem: {e}");
                }
            }
            None => println!("Phase 2: Profile API skipped ({})", self.profile_skipped.as_deref().unwrap_or("")),
        }
        println!();
        println!("Targets (2-core machine):");
        for t in self.targets() {
            let verdict = match (t.pass, t.comparable) {
                (true, true) => "PASS",
                (false, true) => "FAIL",
                (true, false) => "pass*",
                (false, false) => "fail*",
            };
            println!("  [{verdict:<5}] {:<62} target {:<28} measured {}", t.name, t.target, t.measured);
        }
        if self.targets().iter().any(|t| !t.comparable) {
            println!("  * this run's settings differ from the target's conditions; not a verdict");
        }
    }
}

fn write_json(path: &Path, v: &Value) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(v)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Main

async fn wait_ready(http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match http.get(format!("{base}/health/ready")).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) if Instant::now() > deadline => bail!("{base}/health/ready answered {}", r.status()),
            Err(e) if Instant::now() > deadline => return Err(anyhow!(e).context(format!("reaching {base}"))),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::from_cli(&cli)?;
    if let (Some(brokers), Some(mongodb)) = (&cli.compare_kafka, &cli.compare_mongodb) {
        return compare_kafka(&cli, &settings, brokers, mongodb).await;
    }
    let (demo, base, config) = match &cli.url {
        Some(url) => (None, url.trim_end_matches('/').to_string(), Config::from_toml_str("")?),
        None => {
            let demo = DemoServer::start(None, &cli.server_toml, SystemOptions::default())
                .await
                .context("starting Cohort in-process")?;
            let (base, config) = (demo.base.clone(), (*demo.cohort.config).clone());
            (Some(demo), base, config)
        }
    };
    let mode = if demo.is_some() { "in-process" } else { "remote" };
    let machine_before = machine();
    let creds = Creds::new(&cli, &config, &base)?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(settings.concurrency.max(256))
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()?;
    wait_ready(&http, &base).await?;

    let run_tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let run_hash = mix(u64::from_str_radix(&run_tag, 16).unwrap_or(0));
    let students = Students {
        n: settings.students,
        run: run_tag.clone(),
        seed: settings.seed,
        identified_permille: (settings.identified_share * 1000.0).round() as u64,
        phone_offset: run_hash % 10_000_000,
    };
    let plan = Plan::new(&settings);
    if !settings.quiet {
        eprintln!(
            "cohort-bench: {mode} at {base}; run {run_tag}: {} students, {} events ({} batches of {}, {} single calls), concurrency {}",
            thousands(u64::from(settings.students)),
            thousands(settings.events),
            thousands(plan.batches),
            settings.batch,
            thousands(plan.singles),
            settings.concurrency
        );
    }
    let traffic = Traffic::prepare(&students, &creds, &base, &settings)?;
    let usage_before = demo.as_ref().and_then(|_| process_usage());
    // A running Cohort's warehouse progress is read from its counters (see below).
    let silver_before = match &demo {
        Some(_) => 0.0,
        None => scrape(&http, &base, &creds).await?.sum(SILVER_ROWS, &[("layer", "silver")]),
    };
    let (ingest, known) = run_ingest(&http, &base, &creds, &students, traffic, &settings).await?;

    // Phase boundary: let the tail of phase 1 finish (the write-behind flush of its profiles,
    // then the warehouse relay of its outbox), so phase 2 measures reads, not that tail.
    let caught_up = match &demo {
        Some(d) => {
            if let Err(e) = d.cohort.settle(Duration::from_secs(60)).await {
                eprintln!("warning: Cohort did not settle after phase 1: {e:#}");
            }
            drain_warehouse(&d.cohort, settings.settle_timeout).await
        }
        None => wait_for_remote_warehouse(&http, &base, &creds, silver_before, &ingest, settings.settle_timeout).await,
    };
    let warehouse_tail = caught_up.unwrap_or_else(|e| {
        eprintln!("warning: the warehouse did not catch up after phase 1: {e:#}");
        None
    });
    // After the warehouse tail: its relay is part of what every event costs.
    let capacity = match (usage_before, demo.as_ref().and_then(|_| process_usage())) {
        (Some((rss_before, cpu_before)), Some((rss_after, cpu_after))) => {
            let live = scrape(&http, &base, &creds).await?.sum("cohort_profile_actors_live", &[]);
            Some(Capacity {
                rss_before,
                rss_after,
                live_profiles: live,
                cpu_seconds: cpu_after - cpu_before,
                applied: ingest.applied.min(ingest.expected),
            })
        }
        _ => None,
    };
    let (profile, profile_skipped) = if settings.profile_rps == 0 {
        (None, Some("--profile-rps 0".to_string()))
    } else if known.is_empty() {
        (None, Some("no student's userId was accepted in phase 1".to_string()))
    } else {
        // The profile client gets its own pool so ingest connections do not skew it.
        let profile_http = reqwest::Client::builder()
            .pool_max_idle_per_host(settings.profile_concurrency)
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(10))
            .build()?;
        let in_process = demo.is_some();
        (Some(run_profiles(&profile_http, &base, &creds, &students, &known, &settings, in_process).await?), None)
    };

    let report = Report {
        mode,
        base: &base,
        settings: &settings,
        plan,
        run: &run_tag,
        machine: json!({ "at_start": machine_before, "at_end": machine() }),
        ingest: &ingest,
        profile: profile.as_ref(),
        profile_skipped,
        capacity,
        warehouse_tail,
    };
    report.print();
    write_json(&cli.out, &report.to_json())?;
    println!("\nwrote {}", cli.out.display());

    if let Some(demo) = demo {
        if let Err(e) = demo.stop().await {
            eprintln!("warning: stopping the in-process Cohort: {e:#}");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Kafka mode

/// One phase-1 run against an in-process Cohort built from `server_toml`.
struct ModeResult {
    events_per_sec: f64,
    e2p_p99_ms: Option<(f64, bool)>,
    applied: u64,
    all_applied: bool,
    /// Phase 1 only (ingest until every event is applied); `None` off Linux.
    cpu: Option<CpuSplit>,
}

async fn phase1_on(cli: &Cli, settings: &Settings, server_toml: &str) -> anyhow::Result<ModeResult> {
    let demo = DemoServer::start(None, server_toml, SystemOptions::default()).await.context("starting Cohort")?;
    let config = (*demo.cohort.config).clone();
    let creds = Creds::new(cli, &config, &demo.base)?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(settings.concurrency.max(256))
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()?;
    wait_ready(&http, &demo.base).await?;
    let run_tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let students = Students {
        n: settings.students,
        run: run_tag.clone(),
        seed: settings.seed,
        identified_permille: (settings.identified_share * 1000.0).round() as u64,
        phone_offset: mix(u64::from_str_radix(&run_tag, 16).unwrap_or(0)) % 10_000_000,
    };
    let traffic = Traffic::prepare(&students, &creds, &demo.base, settings)?;
    let mark = CpuMark::now();
    let (ingest, _) = run_ingest(&http, &demo.base, &creds, &students, traffic, settings).await?;
    let cpu = mark.and_then(|m| m.split());
    let secs = ingest.applied_elapsed.as_secs_f64();
    let applied = ingest.applied.min(ingest.expected);
    let result = ModeResult {
        events_per_sec: if secs > 0.0 { applied as f64 / secs } else { 0.0 },
        e2p_p99_ms: ingest.e2p.quantile(0.99).map(|(v, open)| (v * 1e3, open)),
        applied,
        all_applied: ingest.all_applied,
        cpu,
    };
    if let Err(e) = demo.stop().await {
        eprintln!("warning: stopping the in-process Cohort: {e:#}");
    }
    Ok(result)
}

/// The broker's own ceiling, measured like Cohort uses it: `n` records of `size` bytes produced
/// with acks=all and idempotence to a fresh topic, and consumed back by a fresh group. The rate
/// is records over the time from the first send to the last record consumed.
async fn raw_broker_rate(brokers: &str, partitions: i32, n: u64, size: usize) -> anyhow::Result<(f64, f64)> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::ClientConfig;
    let topic = format!("bench.raw.{}", uuid::Uuid::new_v4().simple());
    let admin: AdminClient<_> = ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    admin
        .create_topics(&[NewTopic::new(&topic, partitions, TopicReplication::Fixed(1))], &AdminOptions::new())
        .await
        .context("creating the raw benchmark topic")?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bench-raw-{}", uuid::Uuid::new_v4().simple()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[&topic])?;
    let payload = vec![b'x'; size];
    type Delivery =
        Result<rdkafka::producer::future_producer::OwnedDeliveryResult, futures::channel::oneshot::Canceled>;
    let delivered = |r: Delivery| match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(anyhow!("producing to the raw benchmark topic: {e}")),
        Err(_) => Err(anyhow!("the producer dropped a delivery")),
    };
    let started = Instant::now();
    let consume = async {
        let mut got = 0u64;
        while got < n {
            match tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await {
                Ok(Ok(_)) => got += 1,
                Ok(Err(e)) => bail!("consuming the raw benchmark topic: {e}"),
                Err(_) => bail!("raw benchmark: only {got} of {n} records came back within 30 s"),
            }
        }
        Ok(started.elapsed())
    };
    let produce = async {
        let mut pending = futures::stream::FuturesUnordered::new();
        for i in 0..n {
            let key = (i % 10_000).to_string();
            // Bounded below librdkafka's queue, so a send is never refused for space.
            let fut = producer
                .send_result(FutureRecord::to(&topic).key(&key).payload(&payload))
                .map_err(|(e, _)| anyhow!("producing to the raw benchmark topic: {e}"))?;
            pending.push(fut);
            if pending.len() >= 10_000 {
                if let Some(r) = futures::StreamExt::next(&mut pending).await {
                    delivered(r)?;
                }
            }
        }
        while let Some(r) = futures::StreamExt::next(&mut pending).await {
            delivered(r)?;
        }
        Ok(started.elapsed())
    };
    let (produced, consumed) = tokio::try_join!(produce, consume)?;
    // Not deleted: topic deletion has wedged Tansu's admin API for later creates.
    Ok((n as f64 / produced.as_secs_f64().max(1e-9), n as f64 / consumed.as_secs_f64().max(1e-9)))
}

/// Drops the Kafka-mode run's own database; a failure only costs disk, so it is reported, not fatal.
async fn drop_bench_database(url: &str, database: &str) {
    let dropped = async { mongodb::Client::with_uri_str(url).await?.database(database).drop().await };
    if let Err(e) = dropped.await {
        eprintln!("note: the benchmark database {database} was not dropped: {e}");
    }
}

async fn compare_kafka(cli: &Cli, settings: &Settings, brokers: &str, mongodb: &str) -> anyhow::Result<()> {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let database = format!("bench_{tag}");
    let kek = std::env::temp_dir().join(format!("cohort-bench-{tag}.kek"));
    // Same pipeline in both modes; the warehouse is off in both so only bus and store differ.
    let embedded_toml = format!("[warehouse]\nurl = \"none://\"\n{}", cli.server_toml);
    let kafka_toml = format!(
        "[storage]\nurl = \"{mongodb}\"\ndatabase = \"{database}\"\n[bus]\nurl = \"kafka://{brokers}\"\n\
         topic_prefix = \"bench{tag}.\"\ngroup_id = \"bench{tag}\"\n[warehouse]\nurl = \"none://\"\n\
         [gdpr]\nkey_url = \"file:{}\"\n{}",
        kek.display(),
        cli.server_toml
    );
    let partitions = Config::from_toml_layers(&[&kafka_toml])?.bus.partitions;
    eprintln!(
        "cohort-bench (Kafka mode): {} events, embedded first, then Kafka + MongoDB, then the raw broker",
        thousands(settings.events)
    );
    let embedded = phase1_on(cli, settings, &embedded_toml).await.context("embedded mode")?;
    let kafka = phase1_on(cli, settings, &kafka_toml).await.context("Kafka mode");
    // Repeated runs on one database server stay comparable (topics stay: see raw_broker_rate).
    drop_bench_database(mongodb, &database).await;
    let _ = std::fs::remove_file(&kek);
    let kafka = kafka?;
    const RAW_RECORD_BYTES: usize = 1024;
    let mark = CpuMark::now();
    let (raw_produce, raw_e2e) = raw_broker_rate(brokers, partitions, settings.events, RAW_RECORD_BYTES).await?;
    let raw_cpu = mark.and_then(|m| m.split());
    let p99 = |m: &ModeResult| match m.e2p_p99_ms {
        Some((v, true)) => format!("> {v:.1} ms"),
        Some((v, false)) => format!("{v:.2} ms"),
        None => "n/a".into(),
    };
    let vs_embedded = kafka.events_per_sec / embedded.events_per_sec.max(1e-9);
    let vs_raw = kafka.events_per_sec / raw_e2e.max(1e-9);
    println!(
        "Kafka mode ({} events, concurrency {}, batch {})",
        thousands(settings.events),
        settings.concurrency,
        settings.batch
    );
    for (name, m) in [("embedded (redb journal + redb store)", &embedded), ("Kafka + MongoDB", &kafka)] {
        println!(
            "  {name:<38} {:>8} events/s end to end, event-to-profile p99 {}{}",
            thousands(m.events_per_sec.round() as u64),
            p99(m),
            if m.all_applied { "" } else { "  (NOT all applied before the timeout)" }
        );
    }
    println!(
        "  raw broker, same harness ({RAW_RECORD_BYTES} B records, acks=all, idempotent): {} produced/s, {} produced+consumed/s",
        thousands(raw_produce.round() as u64),
        thousands(raw_e2e.round() as u64)
    );
    println!(
        "  Kafka mode / embedded mode: {:.0}% (target >= 50%: {})",
        vs_embedded * 100.0,
        if vs_embedded >= 0.5 { "PASS" } else { "FAIL" }
    );
    println!("  Kafka mode / raw broker produce+consume: {:.0}%", vs_raw * 100.0);
    // On one machine the broker and database stand-ins take cores from Cohort; this shows how much.
    println!("  CPU while each phase ran (this process: Cohort and the load generator, or the raw harness):");
    for (name, cpu) in [("embedded", embedded.cpu), ("Kafka + MongoDB", kafka.cpu), ("raw broker", raw_cpu)] {
        if let Some(cpu) = cpu {
            println!("    {name:<16} {}", cpu.describe());
        }
    }
    let per_event = |m: &ModeResult| m.cpu.map(|c| c.own / m.applied.max(1) as f64 * 1e6);
    if let (Some(e), Some(k)) = (per_event(&embedded), per_event(&kafka)) {
        println!("    CPU of Cohort and the generator per event: embedded {e:.0} us, Kafka + MongoDB {k:.0} us");
    }
    let report = json!({
        "mode": "kafka-compare",
        "events": settings.events,
        "embedded": { "events_per_sec": embedded.events_per_sec, "e2p_p99_ms": embedded.e2p_p99_ms.map(|v| v.0), "applied": embedded.applied, "cpu": embedded.cpu.map(|c| c.to_json()) },
        "kafka_mongodb": { "events_per_sec": kafka.events_per_sec, "e2p_p99_ms": kafka.e2p_p99_ms.map(|v| v.0), "applied": kafka.applied, "cpu": kafka.cpu.map(|c| c.to_json()) },
        "raw_broker": { "record_bytes": RAW_RECORD_BYTES, "produce_per_sec": raw_produce, "produce_consume_per_sec": raw_e2e, "cpu": raw_cpu.map(|c| c.to_json()) },
        "ratio_kafka_to_embedded": vs_embedded,
        "ratio_kafka_to_raw_broker": vs_raw,
        "machine": machine(),
    });
    write_json(&cli.out, &report)?;
    println!("\nwrote {}", cli.out.display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    // A load test measures capacity: the per-credential abuse limits would cap it (one write key,
    // one API token). A `[server]` table of the caller's replaces this one.
    if !cli.server_toml.contains("[server]") {
        cli.server_toml =
            format!("[server]\ningest_requests_per_second = 0\napi_requests_per_second = 0\n{}", cli.server_toml);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(run(cli))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A keep-alive HTTP server that answers every request after `delay`, counting the
    /// connections opened to it.
    async fn counting_server(delay: Duration) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = opened.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match conn.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        buf.drain(..end);
                        tokio::time::sleep(delay).await;
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
                        if conn.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (base, opened)
    }

    /// Burns CPU on its own thread until `until`.
    fn busy_until(until: Instant) -> std::thread::JoinHandle<u64> {
        std::thread::spawn(move || {
            let mut x = 0_u64;
            while Instant::now() < until {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            x
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn phase_two_waits_for_background_work_to_stop_and_gives_up_at_its_limit() {
        let busy = busy_until(Instant::now() + Duration::from_millis(900));
        let quiet = wait_until_quiet(Duration::from_secs(10)).await.unwrap();
        assert!(quiet.reached, "{quiet:?}");
        assert!(quiet.after >= Duration::from_millis(900), "returned while a thread still burned a core: {quiet:?}");
        assert!(quiet.after < Duration::from_secs(5), "{quiet:?}");
        busy.join().unwrap();

        let busy = busy_until(Instant::now() + Duration::from_millis(1_500));
        let gave_up = wait_until_quiet(Duration::from_millis(700)).await.unwrap();
        assert!(!gave_up.reached && gave_up.after >= Duration::from_millis(700), "{gave_up:?}");
        busy.join().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn profile_requests_in_flight_are_bounded_reuse_connections_and_count_their_wait() {
        let (base, opened) = counting_server(Duration::from_millis(20)).await;
        let http = reqwest::Client::builder().pool_max_idle_per_host(4).build().unwrap();
        let slots = Arc::new(tokio::sync::Semaphore::new(4));
        let url = reqwest::Url::parse(&format!("{base}/v1/profiles/user_id:x")).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let scheduled = Instant::now();
        // All due at once, as after a stall of the server: without the bound each would open
        // a connection of its own.
        for _ in 0..40 {
            let (http, slots, url, tx) = (http.clone(), slots.clone(), url.clone(), tx.clone());
            tokio::spawn(profile_request(http, slots, url, Arc::from("Bearer t"), scheduled, 0, tx));
        }
        drop(tx);
        let mut latencies = Vec::new();
        while let Some((latency, service, outcome, _, _)) = rx.recv().await {
            assert!(matches!(outcome, ProfileOutcome::Ok), "every request is answered");
            assert!(latency >= service);
            latencies.push(latency);
        }
        assert_eq!(latencies.len(), 40);
        // The bound is on requests in flight: the client returns a connection to its pool from
        // a task of its own, so a request let in just before that may open one more.
        let opened = opened.load(std::sync::atomic::Ordering::SeqCst);
        assert!((1..=8).contains(&opened), "{opened} connections opened for 4 requests in flight");
        // 40 requests of 20 ms over 4 connections: the last waited for about ten turns, and
        // its latency from the schedule includes that wait.
        let slowest = latencies.iter().copied().max().unwrap_or(0);
        assert!(slowest >= 180_000, "slowest latency {slowest} us does not include the wait for a connection");
    }

    #[test]
    fn parses_labels_with_braces_and_quantiles() {
        let text = "# HELP x\n\
            cohort_api_request_duration_seconds_bucket{method=\"GET\",route=\"/v1/profiles/{ref}\",status=\"200\",le=\"0.001\"} 50\n\
            cohort_api_request_duration_seconds_bucket{method=\"GET\",route=\"/v1/profiles/{ref}\",status=\"200\",le=\"0.005\"} 100\n\
            cohort_api_request_duration_seconds_bucket{method=\"GET\",route=\"/v1/profiles/{ref}\",status=\"200\",le=\"+Inf\"} 100\n\
            cohort_api_request_duration_seconds_count{method=\"GET\",route=\"/v1/profiles/{ref}\",status=\"200\"} 100\n";
        let after = Scrape::parse(text);
        let h = HistogramDelta::between(
            &Scrape::default(),
            &after,
            "cohort_api_request_duration_seconds",
            &[("route", "/v1/profiles/{ref}")],
        );
        assert_eq!(h.count, 100.0);
        let (p50, open) = h.quantile(0.5).unwrap_or((f64::NAN, true));
        assert!(!open && (p50 - 0.001).abs() < 1e-9);
        let (p99, _) = h.quantile(0.99).unwrap_or((f64::NAN, true));
        assert!((p99 - (0.001 + 0.004 * 49.0 / 50.0)).abs() < 1e-9);
        assert_eq!(h.share_within(0.005), Some(1.0));
    }

    #[test]
    fn the_machine_cpu_split_counts_busy_time_and_leaves_the_process_share_out() {
        let text = "cpu  1000 50 200 9000 30 5 15 40 0 0\ncpu0 500 25 100 4500 15 2 7 20 0 0\nintr 1\n";
        let m = MachineCpu::parse(text).unwrap_or_default();
        // user + nice + system + irq + softirq; idle and iowait are not busy.
        assert!((m.busy - 12.7).abs() < 1e-9 && (m.steal - 0.4).abs() < 1e-9, "{m:?}");
        assert_eq!(MachineCpu::parse("cpu0 1 2 3\n"), None, "the first line must be the total");
        assert_eq!(MachineCpu::parse("cpu  1 x 3\n"), None);

        let at = Instant::now();
        let start = CpuMark { at, own: 10.0, machine: MachineCpu { busy: 100.0, steal: 1.0 } };
        let end =
            CpuMark { at: at + Duration::from_secs(5), own: 16.0, machine: MachineCpu { busy: 109.5, steal: 1.5 } };
        let split = CpuSplit::between(&start, &end);
        assert_eq!(split.wall, 5.0);
        assert_eq!(split.own, 6.0);
        assert!((split.others - 3.5).abs() < 1e-9, "{split:?}");
        assert!((split.steal - 0.5).abs() < 1e-9);
        // A process total one tick ahead of the machine total is not negative time for the rest.
        let ahead = CpuMark { own: 19.6, ..end };
        assert_eq!(CpuSplit::between(&start, &ahead).others, 0.0);
    }

    #[test]
    fn synthetic_contacts_are_valid_identifiers() {
        let st =
            Students { n: 100, run: "0123abcd".into(), seed: 7, identified_permille: 300, phone_offset: 9_999_990 };
        for i in [0, 1, 6, 7, 13, 20, 41, 99] {
            let phone = st.phone(i);
            assert_eq!(
                cohort_actors::normalize::normalize_phone(&phone, "DE").as_deref(),
                Some(phone.as_str()),
                "{phone}"
            );
            let email = st.email(i);
            assert_eq!(cohort_actors::normalize::normalize_email(&email).as_deref(), Some(email.as_str()));
            assert_eq!(st.salesforce_id(i).len(), 18);
        }
    }

    /// 1,005 events, a tenth of them single calls, in batches of 100.
    fn small_settings(students: u32, seed: u64) -> Settings {
        Settings {
            students,
            events: 1_005,
            batch: 100,
            concurrency: 1,
            other_share: 0.1,
            identified_share: 0.3,
            ingest_rate: None,
            profile_rps: 0,
            profile_concurrency: 1,
            profile_seconds: 1.0,
            settle_timeout: Duration::from_secs(1),
            seed,
            quick: true,
            quiet: true,
        }
    }

    #[test]
    fn plan_spreads_batches_and_singles_exactly() {
        let s = small_settings(10, 1);
        let plan = Plan::new(&s);
        let (mut events, mut singles) = (0, 0);
        for j in 0..plan.units {
            match plan.unit(j) {
                Unit::Batch { events: e } => events += e,
                Unit::Single { index } => {
                    assert_eq!(index, singles);
                    singles += 1;
                }
            }
        }
        assert_eq!(events + singles, s.events);
        assert_eq!(singles, plan.singles);
    }

    #[test]
    fn traffic_is_rendered_up_front_once_per_unit_and_repeatable_from_its_seed() {
        let s = small_settings(50, 3);
        let st = Students { n: 50, run: "0123abcd".into(), seed: 3, identified_permille: 300, phone_offset: 17 };
        let creds = Creds {
            web_basic: "Basic d2ViOg==".into(),
            mobile_basic: "Basic bW9iaWxlOg==".into(),
            crm_bearer: "Bearer crm".into(),
            api_bearer: "Bearer api".into(),
            twilio_token: "token".into(),
            twilio_url: "http://cohort.test/webhooks/twilio/whatsapp".into(),
        };
        let shape = |t: &Traffic| -> Vec<(usize, u64, Vec<u32>, String)> {
            (0..t.units.len())
                .map(|j| {
                    let slot = t.units[j].lock().unwrap();
                    let b = slot.as_ref().unwrap();
                    (b.kind.index(), b.events, b.user_ids.clone(), b.url.clone())
                })
                .collect()
        };
        let traffic = Traffic::prepare(&st, &creds, "http://cohort.test", &s).unwrap();
        let again = Traffic::prepare(&st, &creds, "http://cohort.test", &s).unwrap();
        let plan = Plan::new(&s);
        assert_eq!(traffic.units.len() as u64, plan.units);
        assert_eq!(shape(&traffic), shape(&again), "one seed, one traffic");

        let (mut events, mut bytes, mut ids) = (0, 0, std::collections::HashSet::new());
        for j in 0..plan.units {
            let built = traffic.take(j).expect("every unit is rendered");
            assert!(traffic.take(j).is_none(), "a unit goes to one worker only");
            events += built.events;
            bytes += built.body.len();
            if built.url.ends_with("/v1/batch") {
                let body: Value = serde_json::from_slice(&built.body).unwrap();
                let batch = body["batch"].as_array().unwrap();
                assert_eq!(batch.len() as u64, built.events);
                for item in batch {
                    assert!(ids.insert(item["messageId"].as_str().unwrap().to_string()), "message ids are unique");
                }
            }
        }
        assert_eq!(events, s.events);
        assert_eq!(bytes, traffic.bytes);
        assert!(traffic.take(plan.units).is_none());
    }
}
