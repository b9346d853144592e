//! The scenarios: each builds its own world (fresh ClickHouse database, MQTT
//! topic prefix, Postgres database, and a private instance of the service it
//! breaks), streams known readings through the real binaries, injects one
//! fault, waits for recovery and asks the oracle.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use emulators::SensorKind;
use test_support::{PrivateService, Service, Stack};

use crate::oracle::{self, EmittedStream, Expected, RollupRow, StoredReading, Verdict};
use crate::procs::{Daemon, Emulator, Spec};

/// One fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// SIGKILL the edge agent, start it again at once.
    KillAgent,
    /// SIGKILL the ingest server, start it again after a pause.
    KillIngest,
    /// Stop the broker cleanly and start it again.
    BrokerRestart,
    /// Stop the broker for the outage duration.
    BrokerDown,
    /// Stop ClickHouse for the outage duration.
    ClickhouseDown,
    /// Stop Postgres (the outbox) cleanly and start it again.
    PostgresRestart,
    /// A small outbox quota filled while the broker is down (back-pressure).
    QuotaReached,
    /// Two ingest servers in a shared subscription group; SIGKILL one.
    SharedGroupKill,
    /// Agent in end-to-end mode (`confirm = ingest`); SIGKILL the ingest server.
    EndToEndKillIngest,
    /// Agent in end-to-end mode; SIGKILL the broker, start it again.
    EndToEndKillBroker,
    /// Two ingest servers in a shared group, one with its clock 2 h ahead
    /// (libfaketime); one stream live, one stream hours late.
    SkewedClocks,
    /// SIGSTOP ClickHouse for longer than the ingest server's MQTT
    /// keep-alive, under load, then SIGCONT: the server keeps its broker
    /// connection, reports the stall, and stores everything by itself.
    ClickhouseStall,
    /// 20 garbage publishes of the broker's largest packet on client topics
    /// during the load: dead-lettered, memory bounded, nothing else harmed.
    OversizeFlood,
    /// A second agent (`confirm = ingest`) whose device clock makes its
    /// readings span 200 days, among the healthy one; ClickHouse refuses its
    /// readings older than 100 days (forced on 18.16 with a `throwIf`
    /// column, as current ClickHouse refuses inserts over 100 partitions).
    BadClockDevice,
    /// SIGKILL the ingest server mid-stream after adding 10^6 stored ranges
    /// of other clients to `ingested_ranges`; start it again: it loads them
    /// all (start-up time and RSS reported) and dedups the stream exactly.
    RestartWithHistory,
    /// Echo mode: the agent and its sensors run before any ingest server
    /// exists (the broker routes their batches to nobody but the agent's own
    /// echo); then one starts, with a new persistent session.
    AgentBeforeIngest,
    /// A `pg_dump` of the outbox taken at the fault is restored under the
    /// running agent a little later: its `next_seq` goes back.
    OutboxRollback,
    /// Echo mode with a small `echo_ahead_max_readings`; ClickHouse is
    /// SIGKILLed for the outage while the ingest server stays connected (and
    /// announced): what lives only in the broker stays within the bound, the
    /// outbox takes the rest.
    EchoAheadBound,
    /// Agent in end-to-end mode; the ingest server is SIGKILLed (the backlog
    /// waits in the outbox), and mosquitto_pub forges ingest acks of every
    /// seq of the agent's epoch, and echoes; then the server starts again.
    ForgedConfirmations,
    /// Remote commands during a fault: Postgres (the outbox) is stopped;
    /// meanwhile an operator sends `pause_intake`, `flush` and, once
    /// Postgres is back, `resume_intake` (mosquitto_pub on the command
    /// topic).
    CommandsDuringFault,
    /// Echo mode; SIGKILL the broker, start it again. Not in the default
    /// set: Mosquitto saves its state only every `autosave_interval`, so a
    /// crash can lose routed-but-unsaved messages that echo mode already
    /// deleted from the outbox (documented in docs/reliability.md).
    KillBroker,
    /// Negative control, not in the default set: the quota scenario with
    /// `quota_policy = drop_oldest`, which deletes acked rows by design. The
    /// oracle must report them lost (this scenario is expected to FAIL).
    QuotaDropOldest,
    /// The ingest server on the shared ClickHouse cluster (`scripts/stack up
    /// --cluster`); SIGKILL the replica of shard 2 it writes to (the first,
    /// `load_balancing = 'in_order'`), start it again: the replicas converge.
    ClusterReplicaKill,
    /// The ingest server on the cluster; stop ZooKeeper cleanly, start it
    /// again: inserts into the replicated tables pause and resume.
    ClusterZookeeperRestart,
    /// Two ingest servers in a shared group on the cluster (each through
    /// another node); SIGKILL one.
    ClusterTwoIngest,
}

impl Fault {
    /// Every scenario, in the order the suite runs them.
    pub const ALL: [Self; 23] = [
        Self::KillAgent,
        Self::KillIngest,
        Self::BrokerRestart,
        Self::BrokerDown,
        Self::ClickhouseDown,
        Self::PostgresRestart,
        Self::QuotaReached,
        Self::SharedGroupKill,
        Self::EndToEndKillIngest,
        Self::EndToEndKillBroker,
        Self::SkewedClocks,
        Self::ClickhouseStall,
        Self::OversizeFlood,
        Self::BadClockDevice,
        Self::RestartWithHistory,
        Self::AgentBeforeIngest,
        Self::OutboxRollback,
        Self::ForgedConfirmations,
        Self::EchoAheadBound,
        Self::CommandsDuringFault,
        Self::ClusterReplicaKill,
        Self::ClusterZookeeperRestart,
        Self::ClusterTwoIngest,
    ];

    /// The scenario's name (as on the command line).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::KillAgent => "kill-agent",
            Self::KillIngest => "kill-ingest",
            Self::BrokerRestart => "broker-restart",
            Self::BrokerDown => "broker-down",
            Self::ClickhouseDown => "clickhouse-down",
            Self::PostgresRestart => "postgres-restart",
            Self::QuotaReached => "quota-reached",
            Self::SharedGroupKill => "shared-group-kill",
            Self::EndToEndKillIngest => "end-to-end-kill-ingest",
            Self::EndToEndKillBroker => "end-to-end-kill-broker",
            Self::SkewedClocks => "skewed-clocks",
            Self::ClickhouseStall => "clickhouse-stall",
            Self::OversizeFlood => "oversize-flood",
            Self::BadClockDevice => "bad-clock-device",
            Self::RestartWithHistory => "restart-with-history",
            Self::AgentBeforeIngest => "agent-before-ingest",
            Self::OutboxRollback => "outbox-rollback",
            Self::ForgedConfirmations => "forged-confirmations",
            Self::EchoAheadBound => "echo-ahead-bound",
            Self::CommandsDuringFault => "commands-during-fault",
            Self::KillBroker => "kill-broker",
            Self::QuotaDropOldest => "quota-drop-oldest",
            Self::ClusterReplicaKill => "cluster-replica-kill",
            Self::ClusterZookeeperRestart => "cluster-zookeeper-restart",
            Self::ClusterTwoIngest => "cluster-two-ingest",
        }
    }

    /// How the fault is injected, for the report.
    #[must_use]
    pub fn how(self, form: &Form) -> String {
        let gap = form.kill_gap.as_secs();
        let pause = form.restart_pause.as_secs();
        let outage = form.outage.as_secs();
        match self {
            Self::KillAgent => "SIGKILL edge-agent, start it again at once (same outbox, same port)".into(),
            Self::KillIngest => format!("SIGKILL ingest-server, start it again after {gap} s (same MQTT session)"),
            Self::BrokerRestart => format!("stop Mosquitto cleanly (SIGTERM), start it again after {pause} s"),
            Self::BrokerDown => format!("stop Mosquitto cleanly, keep it down {outage} s"),
            Self::ClickhouseDown => format!("SIGKILL ClickHouse, keep it down {outage} s"),
            Self::PostgresRestart => format!("stop Postgres (`pg_ctl -m fast`), start it again after {pause} s"),
            Self::CommandsDuringFault => format!(
                "stop Postgres; meanwhile `pause_intake`, {COMMAND_PAUSE_SECS} s later `flush` (mosquitto_pub on \
                 the agent's command topic); start Postgres again after {pause} s more; then `resume_intake`"
            ),
            Self::QuotaReached => {
                format!("outbox quota {} rows (back-pressure); Mosquitto down {outage} s", form.quota_rows)
            }
            Self::SharedGroupKill => {
                format!("2 ingest servers in `$share/chaos/...`; SIGKILL one, start it again after {gap} s")
            }
            Self::EndToEndKillIngest => {
                format!("agent `confirm = ingest`; SIGKILL ingest-server, start it again after {gap} s")
            }
            Self::EndToEndKillBroker => {
                format!("agent `confirm = ingest`; SIGKILL Mosquitto, start it again after {pause} s")
            }
            Self::SkewedClocks => format!(
                "2 ingest servers in `$share/chaos/...`, one under libfaketime +{} h; both `rollup_after_secs` \
                 {ROLLUP_AFTER_SECS_SKEWED}, `rollup_orphan_secs` {ORPHAN_SECS_SKEWED}; one stream live, one {} h \
                 late, for {outage} s",
                SKEW_SECS / 3600,
                LATE_SECS / 3600
            ),
            Self::ClickhouseStall => format!(
                "SIGSTOP ClickHouse for {} s (ingest `mqtt_keep_alive_secs` {STALL_KEEP_ALIVE_SECS}, \
                 `insert_timeout_secs` {STALL_INSERT_TIMEOUT_SECS}), then SIGCONT",
                form.stall().as_secs()
            ),
            Self::OversizeFlood => format!(
                "{FLOOD_MESSAGES} garbage publishes of {} bytes (the shipped broker's max_packet_size less 1 KiB) \
                 on client topics, with mosquitto_pub",
                FLOOD_BYTES
            ),
            Self::RestartWithHistory => format!(
                "{HISTORY_RANGES} stored ranges of {HISTORY_CLIENTS} other clients added to `ingested_ranges`; \
                 SIGKILL ingest-server, start it again after {gap} s"
            ),
            Self::BadClockDevice => format!(
                "a second agent `{BAD_CLIENT}` (`confirm = ingest`) whose readings span {BAD_SPAN_DAYS} days, among \
                 the healthy one; ClickHouse refuses those older than {BAD_REFUSED_DAYS} days (a `throwIf` column \
                 on 18.16); watched for {outage} s"
            ),
            Self::AgentBeforeIngest => format!(
                "agent (echo mode) and sensors run {} s before any ingest server exists; then one starts (a new \
                 persistent session)",
                form.fault_at.as_secs() + outage
            ),
            Self::OutboxRollback => format!(
                "`pg_dump` of the outbox at the fault, restored under the running agent {gap} s later (`psql \
                 --single-transaction`, dump made with `--clean`)"
            ),
            Self::ForgedConfirmations => format!(
                "agent `confirm = ingest`; SIGKILL ingest-server; meanwhile {FORGED} forged ingest acks (seqs \
                 1..=2^40 of the agent's epoch) and {FORGED} forged echoes (a body the server refuses), with \
                 mosquitto_pub; the server starts again after {gap} s"
            ),
            Self::EchoAheadBound => format!(
                "echo mode, `echo_ahead_max_readings` {ECHO_AHEAD_MAX}, `window` {ECHO_AHEAD_WINDOW}; SIGKILL \
                 ClickHouse, keep it down {outage} s (the ingest server stays connected and announced)"
            ),
            Self::KillBroker => format!("echo mode; SIGKILL Mosquitto, start it again after {pause} s"),
            Self::QuotaDropOldest => format!(
                "negative control: quota {} rows, `drop_oldest`, 10x the rate; Mosquitto down {outage} s",
                form.quota_rows
            ),
            Self::ClusterReplicaKill => format!(
                "ingest server on the cluster (`--clickhouse-cluster`, first node); SIGKILL `{VICTIM_REPLICA}` (shard \
                 2's first replica, where it writes), start it again after {gap} s (`scripts/stack kill|start`)"
            ),
            Self::ClusterZookeeperRestart => format!(
                "ingest server on the cluster; stop ZooKeeper cleanly, start it again after {pause} s \
                 (`scripts/stack stop|start zookeeper`)"
            ),
            Self::ClusterTwoIngest => format!(
                "2 ingest servers in `$share/chaos/...` on the cluster (through `ch-s1r1` and `ch-s2r1`); SIGKILL \
                 one, start it again after {gap} s"
            ),
        }
    }

    /// Whether it runs on the shared ClickHouse cluster (`scripts/stack up
    /// --cluster`) instead of the single ClickHouse.
    #[must_use]
    pub fn on_cluster(self) -> bool {
        matches!(self, Self::ClusterReplicaKill | Self::ClusterZookeeperRestart | Self::ClusterTwoIngest)
    }

    /// Whether the agent runs with `confirm = ingest`.
    #[must_use]
    pub fn end_to_end(self) -> bool {
        matches!(self, Self::EndToEndKillIngest | Self::EndToEndKillBroker | Self::ForgedConfirmations)
    }

    fn private_service(self) -> Option<Service> {
        match self {
            Self::BrokerRestart
            | Self::BrokerDown
            | Self::QuotaReached
            | Self::QuotaDropOldest
            | Self::EndToEndKillBroker
            | Self::KillBroker => Some(Service::Mqtt),
            Self::ClickhouseDown | Self::ClickhouseStall | Self::EchoAheadBound => Some(Service::ClickHouse),
            Self::PostgresRestart | Self::CommandsDuringFault => Some(Service::Postgres),
            _ => None,
        }
    }

    /// How long the fault is expected to last (to size the emission).
    fn expected_duration(self, form: &Form) -> Duration {
        match self {
            Self::KillAgent => Duration::from_secs(1),
            Self::KillIngest
            | Self::SharedGroupKill
            | Self::EndToEndKillIngest
            | Self::RestartWithHistory
            | Self::OutboxRollback
            | Self::ForgedConfirmations
            | Self::ClusterTwoIngest => form.kill_gap,
            // The restarted node or ZooKeeper answers a second or two later.
            Self::ClusterReplicaKill => form.kill_gap + Duration::from_secs(2),
            Self::ClusterZookeeperRestart => form.restart_pause + Duration::from_secs(2),
            Self::BrokerRestart | Self::PostgresRestart | Self::EndToEndKillBroker | Self::KillBroker => {
                form.restart_pause + Duration::from_secs(1)
            }
            Self::BrokerDown
            | Self::ClickhouseDown
            | Self::EchoAheadBound
            | Self::QuotaReached
            | Self::QuotaDropOldest
            | Self::SkewedClocks
            | Self::AgentBeforeIngest => form.outage,
            Self::ClickhouseStall => form.stall(),
            Self::OversizeFlood => Duration::from_secs(2),
            Self::BadClockDevice => form.outage,
            Self::CommandsDuringFault => form.restart_pause + Duration::from_secs(COMMAND_PAUSE_SECS + 2),
        }
    }
}

/// Short (CI) or long form: rates and durations.
#[derive(Debug, Clone)]
pub struct Form {
    /// The long form.
    pub long: bool,
    /// Readings per second per emulator (two emulators per scenario).
    pub rate: u64,
    /// Emission before the fault.
    pub fault_at: Duration,
    /// A killed ingest server stays dead this long.
    pub kill_gap: Duration,
    /// Pause between stop and start of a restarted service.
    pub restart_pause: Duration,
    /// Outage of broker / ClickHouse.
    pub outage: Duration,
    /// Emission after the fault.
    pub tail: Duration,
    /// Outbox quota of the quota scenario.
    pub quota_rows: u64,
    /// Generous deadline for the emulators to finish and for recovery.
    pub deadline: Duration,
}

impl Form {
    /// Each scenario within about 60 s.
    #[must_use]
    pub fn short() -> Self {
        Self {
            long: false,
            rate: 1000,
            fault_at: Duration::from_secs(3),
            kill_gap: Duration::from_secs(2),
            restart_pause: Duration::from_secs(1),
            outage: Duration::from_secs(10),
            tail: Duration::from_secs(3),
            quota_rows: 3000,
            deadline: Duration::from_secs(120),
        }
    }

    /// How long clickhouse-stall freezes ClickHouse: the outage, and 120 s
    /// in the long form (twice the broker's keep-alive grace of a default
    /// 60 s keep-alive, were it not shortened).
    #[must_use]
    pub fn stall(&self) -> Duration {
        if self.long {
            Duration::from_secs(120)
        } else {
            self.outage
        }
    }

    /// 60 s outages, higher rate.
    #[must_use]
    pub fn long() -> Self {
        Self {
            long: true,
            rate: 2000,
            fault_at: Duration::from_secs(10),
            kill_gap: Duration::from_secs(10),
            restart_pause: Duration::from_secs(5),
            outage: Duration::from_secs(60),
            tail: Duration::from_secs(10),
            quota_rows: 20_000,
            deadline: Duration::from_secs(300),
        }
    }
}

/// What the suite runs against.
#[derive(Debug, Clone)]
pub struct Env {
    /// Directory with `edge-agent`, `ingest-server`, `temperature`, `pressure`.
    pub bins: PathBuf,
    /// The shared stack.
    pub stack: Stack,
    /// Logs of this run.
    pub work: PathBuf,
    /// Short or long.
    pub form: Form,
    /// Keep the ClickHouse database even when the scenario passes.
    pub keep_data: bool,
}

/// A scenario's result.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Which.
    pub fault: Fault,
    /// The oracle's verdict (`None` when the scenario broke before it).
    pub verdict: Option<Verdict>,
    /// Why the scenario could not be judged, or why it failed beyond the verdict.
    pub error: Option<String>,
    /// Fault end until everything acked is stored and the outbox is empty.
    pub recovery: Option<Duration>,
    /// Injection until the broken thing answers again.
    pub fault_duration: Duration,
    /// Fault end until the emulators had every reading acked and exited
    /// (the load runs on after the fault; recovery cannot end before this).
    pub load_done: Option<Duration>,
    /// Whole scenario, set-up to tear-down.
    pub wall: Duration,
    /// Counters worth knowing (replays, republishes, resends, ...).
    pub notes: String,
    /// A few findings of the oracle.
    pub examples: Vec<String>,
}

impl Outcome {
    /// Judged and clean.
    #[must_use]
    pub fn pass(&self) -> bool {
        self.error.is_none() && self.verdict.is_some_and(|v| v.pass())
    }
}

/// Runs one scenario; never panics (a panic inside becomes an error).
pub async fn run(env: &Env, fault: Fault) -> Outcome {
    let started = Instant::now();
    // The shared cluster must be up before anything is made on it.
    let cluster = if fault.on_cluster() {
        match crate::cluster::require() {
            Ok(cluster) => Some(cluster),
            Err(e) => {
                let mut outcome = failed(fault, format!("{e:#}"));
                outcome.wall = started.elapsed();
                return outcome;
            }
        }
    } else {
        None
    };
    let env2 = env.clone();
    let result = tokio::spawn(async move { run_inner(&env2, fault).await }).await;
    let mut outcome = match result {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(error)) => failed(fault, format!("{error:#}")),
        Err(join) => failed(fault, format!("panicked: {join}")),
    };
    // The cluster is shared: whatever happened, leave it running and
    // answering.
    if let Some(cluster) = cluster {
        if let Err(e) = blocking(move || crate::cluster::restore(&cluster)).await.and_then(|r| r) {
            let e = format!("{e:#}");
            outcome.error = Some(outcome.error.map_or_else(|| e.clone(), |before| format!("{before}; {e}")));
        }
    }
    outcome.wall = started.elapsed();
    outcome
}

fn failed(fault: Fault, error: String) -> Outcome {
    Outcome {
        fault,
        verdict: None,
        error: Some(error),
        recovery: None,
        fault_duration: Duration::ZERO,
        load_done: None,
        wall: Duration::ZERO,
        notes: String::new(),
        examples: Vec::new(),
    }
}

/// Polls the agent's metric `name` until `ok` holds or `within` passes.
async fn wait_metric(agent: &Daemon, name: &str, ok: impl Fn(f64) -> bool, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if agent.metric(name).await.is_some_and(&ok) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| anyhow!("{e}"))
}

const START_WITHIN: Duration = Duration::from_secs(60);
const INGEST_READY: &str = "telemetry_ingest_subscribed 1";
const AGENT_READY: &str = "telemetry_agent_mqtt_connected 1";

/// The two emulators every scenario runs: (kind, prefix, sensors, seed).
const EMULATORS: [(SensorKind, &str, usize, u64); 2] =
    [(SensorKind::Temperature, "temp", 4, 1000), (SensorKind::Pressure, "pres", 3, 2000)];
/// Synthetic timestamps advance 20 ms per reading of a sensor: a short run
/// spans a few minutes of data (several rollup minutes).
const TS_STEP: i64 = 20_000;
/// How far behind the real clock the synthetic timestamps start: readings
/// arriving hours late (every scenario; the second stream of skewed-clocks).
const LATE_SECS: i64 = 3 * 3600;
/// restart-with-history: stored ranges added before the restart (disjoint:
/// none merges with another in the dedup memory).
const HISTORY_RANGES: u64 = 1_000_000;

/// restart-with-history: the clients they belong to.
const HISTORY_CLIENTS: u64 = 10_000;

/// bad-clock-device: the misbehaving device.
const BAD_CLIENT: &str = "chaos-bad";

/// bad-clock-device: its readings span this many days, ending now.
const BAD_SPAN_DAYS: i64 = 200;

/// bad-clock-device: ClickHouse refuses its readings older than this.
const BAD_REFUSED_DAYS: i64 = 100;

/// bad-clock-device: the longest the healthy stream may go without a new
/// reading stored while the bad device is being isolated.
const BAD_MAX_HEALTHY_GAP: Duration = Duration::from_secs(10);

/// bad-clock-device: the agent's `batch_max_readings` (its default).
const BAD_BATCH_READINGS: i64 = 2000;

/// oversize-flood: publishes sent.
const FLOOD_MESSAGES: u64 = 20;

/// oversize-flood: bytes per publish, just under the shipped broker's
/// `max_packet_size` (4 MiB) with room for the topic and header.
const FLOOD_BYTES: usize = (4 << 20) - 1024;

/// oversize-flood: how much the ingest server's peak RSS may grow (the 20
/// publishes are 80 MiB together; the broker's `max_inflight_bytes` and the
/// 64 KiB kept per dead letter bound what it holds).
const FLOOD_RSS_BOUND_MIB: u64 = 200;

/// oversize-flood: the publishes, through `mosquitto_pub` (a client outside
/// the pipeline). Version byte 0x01 and garbage after it: each is decoded
/// as far as it goes and dead-lettered.
fn flood(dir: &std::path::Path, host: &str, port: u16, prefix: &str) -> Result<()> {
    let file = dir.join("flood.bin");
    let mut bytes: Vec<u8> = (0..FLOOD_BYTES).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    bytes[0] = 1;
    std::fs::write(&file, bytes).context("write the flood payload")?;
    for i in 0..FLOOD_MESSAGES {
        mosquitto_pub(host, port, &format!("{prefix}/client/flood-{i}"), &file)?;
    }
    Ok(())
}

/// Publishes the contents of `file` on `topic`, QoS 1, with mosquitto_pub.
fn mosquitto_pub(host: &str, port: u16, topic: &str, file: &std::path::Path) -> Result<()> {
    let out = std::process::Command::new("mosquitto_pub")
        .args(["-h", host, "-p", &port.to_string(), "-q", "1", "-t", topic, "-f"])
        .arg(file)
        .output()
        .context("run mosquitto_pub (Debian package mosquitto-clients)")?;
    if !out.status.success() {
        bail!("mosquitto_pub failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// echo-ahead-bound: the agent's `echo_ahead_max_readings` and `window`
/// (small, so that the bound plus the batches in flight is a tight check).
const ECHO_AHEAD_MAX: u64 = 5000;
const ECHO_AHEAD_WINDOW: u64 = 4;

/// commands-during-fault: seconds between `pause_intake` and `flush`.
const COMMAND_PAUSE_SECS: u64 = 2;

/// commands-during-fault: publishes the command `name` (id `id`) to the
/// agent `client_id`, as an operator would by hand.
fn send_command(dir: &std::path::Path, host: &str, port: u16, prefix: &str, client_id: &str, name: &str) -> Result<()> {
    let expires_at_ms =
        i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis())? + 60_000;
    let command = telemetry_wire::Command::new(
        format!("chaos-{name}"),
        telemetry_wire::CommandName::parse(name).context("a known command")?,
        Default::default(),
        expires_at_ms,
    );
    let file = dir.join(format!("command-{name}.json"));
    std::fs::write(&file, command.encode()).context("write the command")?;
    mosquitto_pub(host, port, &format!("{prefix}/cmd/{client_id}"), &file)
}

/// forged-confirmations: forged echoes and forged acks, each.
const FORGED: u64 = 20;

/// forged-confirmations: the forged messages, written under `dir`: an ingest
/// ack of seqs 1..=2^40 of the agent's epoch (every row it will ever have),
/// and an echo with the agent's header (client id, epoch, seqs 1..=2^40)
/// whose body the ingest server refuses (one reading: dead-lettered, never
/// stored).
fn forge(dir: &std::path::Path, client_id: &str, epoch: u64, ts: i64) -> Result<(PathBuf, PathBuf)> {
    let echo = telemetry_wire::Batch {
        client_id: client_id.to_owned(),
        epoch,
        first_seq: 1,
        last_seq: 1 << 40,
        readings: vec![telemetry_wire::Reading::new("forged", ts, 0.0)],
    };
    let ack =
        telemetry_wire::IngestAck::stored(vec![telemetry_wire::SeqRange { epoch, first_seq: 1, last_seq: 1 << 40 }]);
    let (echo_file, ack_file) = (dir.join("forged-echo.bin"), dir.join("forged-ack.bin"));
    std::fs::write(&echo_file, echo.encode()).context("write the forged echo")?;
    std::fs::write(&ack_file, ack.encode()).context("write the forged ack")?;
    Ok((echo_file, ack_file))
}

/// cluster-replica-kill: the replica SIGKILLed: shard 2's first, which the
/// ingest server writes to and reads from (`load_balancing = 'in_order'`).
const VICTIM_REPLICA: &str = "ch-s2r1";

/// cluster-zookeeper-restart: inserts must resume this soon after ZooKeeper
/// answers again (about 10 s measured: the replicated tables stay read-only
/// until their sessions are back).
const ZK_RESUME_WITHIN: Duration = Duration::from_secs(60);

/// The cluster scenarios: the replicas must hold the same readings this
/// soon after the recovery (a restarted replica takes part in replication
/// about 10 s after its start).
const CONVERGE_WITHIN: Duration = Duration::from_secs(60);

const INSERTED: &str = "telemetry_ingest_inserted_readings_total";
const INSERT_RETRIES: &str = "telemetry_ingest_insert_retries_total";

/// clickhouse-stall: the ingest server's MQTT keep-alive, shorter than the
/// stall, so that a server that stopped polling would be dropped.
const STALL_KEEP_ALIVE_SECS: u64 = 5;

/// clickhouse-stall: the ingest server's `insert_timeout_secs`, shorter than
/// the stall, so that the stall must be reported.
const STALL_INSERT_TIMEOUT_SECS: u64 = 3;

/// clickhouse-stall: the ingest server's peak RSS bound. Messages pile up
/// while ClickHouse hangs; the broker's in-flight limits (30,000 messages,
/// 128 MiB) bound them, so the server stays far below this (21 MiB measured
/// in the short form).
const STALL_RSS_BOUND_MIB: u64 = 512;

/// clickhouse-stall: everything must be stored this soon after SIGCONT.
const STALL_RECOVERY: Duration = Duration::from_secs(60);

/// skewed-clocks: how far ahead of the real clock the second ingest
/// server's clock runs (libfaketime).
const SKEW_SECS: i64 = 2 * 3600;
/// skewed-clocks: `rollup_after_secs` of both servers (the default). With 0,
/// as in the other scenarios, every minute is closed at once whatever the
/// clock says, and the skew would decide nothing.
const ROLLUP_AFTER_SECS_SKEWED: u64 = 70;
/// skewed-clocks: `rollup_orphan_secs` of both servers. A peer's markers
/// are adopted this long after they were written (by ClickHouse's clock),
/// not 300 s: the real-clock server's markers of live minutes are consumed
/// within the run, and each server consumes its own closed minutes first,
/// which leaves the last fold of many late minutes to the server whose clock
/// is behind (see docs/reliability.md).
const ORPHAN_SECS_SKEWED: i64 = 10;
/// skewed-clocks: the hours-late stream's timestamps span this much (from
/// [`LATE_SECS`] ago), whatever the form: many minutes, each one's readings
/// arriving within a fraction of a second and split between the servers.
const LATE_SPAN_SECS: i64 = 90 * 60;
/// skewed-clocks: slack when telling the two clocks apart.
const CLOCK_SLACK_SECS: i64 = 120;

#[allow(clippy::too_many_lines)] // one linear story: set up, stream, break, recover, judge
async fn run_inner(env: &Env, fault: Fault) -> Result<Outcome> {
    let form = &env.form;
    let dir = env.work.join(fault.name());
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let skewed = fault == Fault::SkewedClocks;
    // Fail before creating anything when the skew cannot be applied.
    let faketime = if skewed { Some(libfaketime()?) } else { None };

    // --- the world -----------------------------------------------------------
    let private = match fault.private_service() {
        Some(service) => Some(Arc::new(blocking(move || PrivateService::start(service)).await?)),
        None => None,
    };
    let port_of = |s: Service| private.as_ref().filter(|_| fault.private_service() == Some(s)).map(|p| p.port);
    let mqtt_port = port_of(Service::Mqtt).unwrap_or(env.stack.mqtt_port);
    // The cluster scenarios: the shared cluster (checked by `run`), read
    // through its first node, where the `Distributed` tables answer under
    // the usual names.
    let cluster = if fault.on_cluster() { Some(crate::cluster::require()?) } else { None };
    let ch_url = match (&cluster, port_of(Service::ClickHouse)) {
        (Some(cluster), _) => cluster.nodes[0].url.clone(),
        (None, Some(port)) => format!("http://127.0.0.1:{port}"),
        (None, None) => env.stack.ch_url.clone(),
    };
    let (pg_url, shared_pg) = match port_of(Service::Postgres) {
        Some(port) => (format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"), false),
        None => (test_support::fresh_pg_database(&env.stack).await, true),
    };
    let database = test_support::unique_name("chaos");
    let prefix = test_support::topic_prefix();
    let mut ch = clickhouse::Client::default().with_url(&ch_url).with_validation(false);
    if cluster.is_some() {
        // The replicas the ingest server uses (the first of each shard that
        // is up), as stable a view as a read through a Distributed table has.
        ch = ch.with_setting("load_balancing", "in_order");
    }
    let on_cluster = cluster.as_ref().map_or_else(String::new, |c| format!(" ON CLUSTER {}", c.name));

    let ingest_count =
        if matches!(fault, Fault::SharedGroupKill | Fault::SkewedClocks | Fault::ClusterTwoIngest) { 2 } else { 1 };
    let rollup_after = if skewed { ROLLUP_AFTER_SECS_SKEWED } else { 0 };
    let mut skews = Vec::new();
    let mut ingests = Vec::new();
    let mut ingest_ids = Vec::new();
    // agent-before-ingest: the server is started by the fault, not here.
    let mut deferred = None;
    for n in 1..=ingest_count {
        let http = format!("127.0.0.1:{}", test_support::free_port());
        let id = test_support::unique_name(&format!("chaos_ingest{n}"));
        // On the cluster, server n talks to node n (any node has every table).
        let url = cluster.as_ref().map_or_else(|| ch_url.clone(), |c| c.nodes[(n - 1) % c.nodes.len()].url.clone());
        let mut spec = Spec::new(&format!("ingest-{n}"), env.bins.join("ingest-server"), &dir)
            .flag("mqtt-port", mqtt_port)
            .flag("mqtt-client-id", &id)
            .flag("topic-prefix", &prefix)
            .flag("clickhouse-url", &url)
            .flag("clickhouse-database", &database)
            .flag("http-address", &http)
            .flag("batch-max-delay-ms", 200)
            .flag("rollup-after-secs", rollup_after)
            .flag("rollup-interval-ms", 500)
            // Short, so that scenarios end soon; not 0, so that late
            // readings go through the quiet rule as in production.
            .flag("rollup-quiet-secs", if skewed { 5 } else { 1 })
            .flag("retry-max-ms", 2000)
            .env("RUST_LOG", "info");
        if ingest_count > 1 {
            spec = spec.flag("shared-group", "chaos");
        }
        if let Some(cluster) = &cluster {
            spec = spec.flag("clickhouse-cluster", &cluster.name);
        }
        if skewed {
            spec = spec.flag("rollup-orphan-secs", ORPHAN_SECS_SKEWED);
        }
        if fault == Fault::ClickhouseStall {
            spec = spec
                .flag("mqtt-keep-alive-secs", STALL_KEEP_ALIVE_SECS)
                .flag("insert-timeout-secs", STALL_INSERT_TIMEOUT_SECS);
        }
        if let (Some(lib), 2) = (&faketime, n) {
            // The wall clock only: tokio's timers run on CLOCK_MONOTONIC.
            spec = spec
                .env("LD_PRELOAD", lib.display())
                .env("FAKETIME", format!("+{SKEW_SECS}"))
                .env("FAKETIME_DONT_FAKE_MONOTONIC", 1);
        }
        if fault == Fault::AgentBeforeIngest {
            deferred = Some((spec, http));
            ingest_ids.push(id);
            continue;
        }
        let daemon = Daemon::start(spec, http, Some(INGEST_READY), START_WITHIN).await?;
        if skewed {
            // The server's own clock, as its API reports it: proof that the
            // skew took (or did not) before any reading is sent.
            let want = if n == 2 { SKEW_SECS } else { 0 };
            let skew = clock_skew(&daemon).await?;
            if (skew - want).abs() > CLOCK_SLACK_SECS {
                bail!("ingest-{n}'s clock is {skew:+} s off the real one, not {want:+} s: the skew is not as intended");
            }
            skews.push(skew);
        }
        ingests.push(daemon);
        ingest_ids.push(id);
    }
    let bad_clock = fault == Fault::BadClockDevice;
    let real_now_s = i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs())?;
    let refused_before_us = (real_now_s - BAD_REFUSED_DAYS * 86_400) * 1_000_000;
    if bad_clock {
        // What current ClickHouse does to an INSERT over 100 partitions,
        // forced on 18.16 for the bad device's old readings: a refusal with
        // a code the server cannot classify (395), every time.
        let sql = format!(
            "ALTER TABLE `{database}`.readings ADD COLUMN refused UInt8 \
             MATERIALIZED throwIf(client_id = '{BAD_CLIENT}' AND ts < {refused_before_us})"
        );
        ch.query(&sql).execute().await.context("add the refusing column")?;
    }
    if skewed {
        // The servers created the schema before subscribing.
        for sql in clock_log_ddl(&format!("`{database}`")) {
            ch.query(&sql).execute().await.context("create the clock logs")?;
        }
    }

    // On the cluster: a client of the shard with two replicas (all of a
    // client's rows live on one shard), so that its replicas take the load.
    let client_name = match &cluster {
        Some(c) => {
            let shards = c.shards();
            let shard = shards.iter().copied().find(|&s| c.replicas(s).count() > 1).context("a shard with replicas")?;
            crate::cluster::client_on_shard(&ch, u32::try_from(shards.len())?, shard).await?
        }
        None => "chaos-1".to_owned(),
    };
    let client_id = client_name.as_str();
    let listen_port = test_support::free_port();
    let agent_http = format!("127.0.0.1:{}", test_support::free_port());
    let mut agent_spec = Spec::new("agent", env.bins.join("edge-agent"), &dir)
        .flag("client-id", client_id)
        .flag("listen", format!("tcp://127.0.0.1:{listen_port}"))
        .flag("postgres-url", &pg_url)
        .flag("mqtt-port", mqtt_port)
        .flag("mqtt-client-id", test_support::unique_name("chaos_agent"))
        .flag("topic-prefix", &prefix)
        .flag("http-listen", &agent_http)
        .flag("confirm", if fault.end_to_end() { "ingest" } else { "echo" })
        .env("RUST_LOG", "info");
    if matches!(fault, Fault::QuotaReached | Fault::QuotaDropOldest) {
        agent_spec = agent_spec.flag("quota-rows", form.quota_rows);
    }
    if fault == Fault::EchoAheadBound {
        agent_spec = agent_spec.flag("echo-ahead-max-readings", ECHO_AHEAD_MAX).flag("window", ECHO_AHEAD_WINDOW);
    }
    if fault == Fault::QuotaDropOldest {
        agent_spec = agent_spec.flag("quota-policy", "drop-oldest");
    }
    let mut agent = Daemon::start(agent_spec, agent_http, Some(AGENT_READY), START_WITHIN).await?;
    let mut bad_agent = None;
    if bad_clock {
        let pg = test_support::fresh_pg_database(&env.stack).await;
        let (port, http) = (test_support::free_port(), format!("127.0.0.1:{}", test_support::free_port()));
        let spec = Spec::new("agent-bad", env.bins.join("edge-agent"), &dir)
            .flag("client-id", BAD_CLIENT)
            .flag("listen", format!("tcp://127.0.0.1:{port}"))
            .flag("postgres-url", &pg)
            .flag("mqtt-port", mqtt_port)
            .flag("mqtt-client-id", test_support::unique_name("chaos_bad_agent"))
            .flag("topic-prefix", &prefix)
            .flag("http-listen", &http)
            .flag("confirm", "ingest")
            .env("RUST_LOG", "info");
        bad_agent = Some((Daemon::start(spec, http, Some(AGENT_READY), START_WITHIN).await?, pg, port));
    }

    // --- stream known readings ---------------------------------------------------
    let emission = form.fault_at + fault.expected_duration(form) + form.tail;
    // The negative control sends 10x faster: the agent's publisher keeps up
    // to 100,000 committed readings in memory and publishes them after the
    // outage even when the quota dropped them from the outbox, so only an
    // outage that brings more than that loses anything.
    let rate = if fault == Fault::QuotaDropOldest { form.rate * 10 } else { form.rate };
    let per_emulator = rate * emission.as_secs();
    let now_s = i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs())?;
    let start_ts = (now_s - LATE_SECS) / 60 * 60 * 1_000_000;
    let mut emulators = Vec::new();
    let mut streams = Vec::new();
    for (i, (kind, name, sensors, seed)) in EMULATORS.into_iter().enumerate() {
        // skewed-clocks: the first stream is live (its timestamps follow the
        // real clock, so its minutes are open), the second hours late.
        let (start_ts, ts_step) = if skewed && i == 0 {
            (now_s * 1_000_000, i64::try_from(u64::try_from(sensors)? * 1_000_000 / rate.max(1))?)
        } else if skewed {
            let per_sensor = i64::try_from(per_emulator / u64::try_from(sensors)?)?;
            (start_ts, LATE_SPAN_SECS * 1_000_000 / per_sensor.max(1))
        } else {
            (start_ts, TS_STEP)
        };
        let stream = EmittedStream {
            client_id: client_id.to_owned(),
            kind,
            prefix: name.to_owned(),
            sensors,
            seed,
            start_ts,
            ts_step,
            generated: 0,
            acked: 0,
        };
        emulators.push(start_emulator(env, &dir, &stream, listen_port, rate, per_emulator)?);
        streams.push(stream);
    }

    let bad_ts_step = BAD_SPAN_DAYS * 86_400_000_000 / i64::try_from(per_emulator.max(1))?;
    if let Some((_, _, port)) = &bad_agent {
        let start_ts = (real_now_s - BAD_SPAN_DAYS * 86_400) * 1_000_000;
        let ts_step = bad_ts_step;
        let stream = EmittedStream {
            client_id: BAD_CLIENT.to_owned(),
            kind: SensorKind::Temperature,
            prefix: "bad".to_owned(),
            sensors: 1,
            seed: 3000,
            start_ts,
            ts_step,
            generated: 0,
            acked: 0,
        };
        emulators.push(start_emulator(env, &dir, &stream, *port, rate, per_emulator)?);
        streams.push(stream);
    }

    // --- the fault -----------------------------------------------------------------
    tokio::time::sleep(form.fault_at).await;
    let mut notes = Vec::new();
    let fault_start = Instant::now();
    let mut answering_at = None;
    let mut stall_reported = None;
    let mut replica_retries = None;
    let mut flood_base_rss = None;
    let mut healthy_gap = None;
    let mut fault_error: Option<String> = None;
    match fault {
        Fault::KillAgent => {
            agent.kill().await;
            agent.restart(START_WITHIN).await?;
        }
        Fault::ClickhouseStall => {
            let p = private.clone().context("private service")?;
            let frozen = p.clone();
            blocking(move || frozen.freeze()).await?;
            let mut reported = false;
            while fault_start.elapsed() < form.stall() {
                let health = test_support::http::http_get(&ingests[0].http, "/healthz").await.unwrap_or_default();
                reported |= health.starts_with("stalled");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            blocking(move || p.thaw()).await?;
            answering_at = Some(Instant::now());
            stall_reported = Some(reported);
        }
        Fault::BadClockDevice => {
            // The fault runs from the start; here the healthy stream's
            // progress is watched while the bad one is isolated.
            let healthy = format!(
                "SELECT count() FROM (SELECT sensor, ts FROM `{database}`.readings \
                 WHERE client_id = '{client_id}' GROUP BY sensor, ts)"
            );
            let (mut last, mut since, mut worst) = (0, Instant::now(), Duration::ZERO);
            // Until the emulators stop emitting: later there is nothing new to store.
            while fault_start.elapsed() < form.outage + form.tail {
                let n = query_count(&ch, &healthy).await.unwrap_or(0);
                if n > last {
                    worst = worst.max(since.elapsed());
                    (last, since) = (n, Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            healthy_gap = Some(worst.max(since.elapsed()));
        }
        Fault::OversizeFlood => {
            let dir = dir.clone();
            let (host, port, prefix) = (env.stack.mqtt_host.clone(), env.stack.mqtt_port, prefix.clone());
            let base = ingests[0].peak_rss_mib();
            blocking(move || flood(&dir, &host, port, &prefix)).await??;
            flood_base_rss = base;
        }
        Fault::SkewedClocks => {
            // The skew is there from the start: this is the window in which
            // both streams flow through the pair (the clock logs, read at
            // the end, show what each server did in it).
            tokio::time::sleep(form.outage).await;
        }
        Fault::RestartWithHistory => {
            let history = format!(
                "INSERT INTO `{database}`.ingested_ranges (client_id, epoch, first_seq, last_seq, inserted_at) \
                 SELECT concat('history-', toString(number % {HISTORY_CLIENTS})), 1, \
                 intDiv(number, {HISTORY_CLIENTS}) * 200 + 1, intDiv(number, {HISTORY_CLIENTS}) * 200 + 100, now() \
                 FROM numbers({HISTORY_RANGES})"
            );
            ch.query(&history).execute().await.context("add the history")?;
            let victim = &mut ingests[0];
            victim.kill().await;
            tokio::time::sleep(form.kill_gap).await;
            let started = Instant::now();
            victim.restart(START_WITHIN).await?;
            let startup = started.elapsed();
            let rss = victim.peak_rss_mib().map_or_else(|| "?".to_owned(), |m| m.to_string());
            notes.push(format!(
                "restart with {HISTORY_RANGES} stored ranges: subscribed after {:.1} s, peak RSS {rss} MiB",
                startup.as_secs_f64()
            ));
        }
        Fault::AgentBeforeIngest => {
            tokio::time::sleep(form.outage).await;
            let held = agent.metric("telemetry_agent_echo_held_batches").await.unwrap_or(0.0);
            let rows = agent.metric("telemetry_agent_outbox_rows").await.unwrap_or(0.0);
            notes.push(format!("before any ingest server: {held} echoed batches held, outbox {rows} rows"));
            if held == 0.0 {
                fault_error = Some("no echoed batch was held: the scenario did not exercise its fault".to_owned());
            }
            let (spec, http) = deferred.take().context("the deferred ingest server")?;
            ingests.push(Daemon::start(spec, http, Some(INGEST_READY), START_WITHIN).await?);
        }
        Fault::ForgedConfirmations => {
            let epoch: u64 = pg_tool_in("psql", &pg_url, &["-tA", "-c", "SELECT epoch FROM edge_agent.outbox_meta"])?
                .trim()
                .parse::<i64>()
                .context("the agent's epoch")? as u64;
            let (echo, ack) = forge(&dir, client_id, epoch, start_ts)?;
            const REJECTED: &str = "telemetry_agent_confirmations_rejected_total";
            let before = agent.metric(REJECTED).await.unwrap_or(0.0);
            // The backlog now waits in the outbox: what a forged ack could delete.
            ingests[0].kill().await;
            let (host, port, prefix) = (env.stack.mqtt_host.clone(), mqtt_port, prefix.clone());
            let client = client_id.to_owned();
            blocking(move || -> Result<()> {
                for _ in 0..FORGED {
                    mosquitto_pub(&host, port, &format!("{prefix}/client/{client}"), &echo)?;
                    mosquitto_pub(&host, port, &format!("{prefix}/ack/{client}"), &ack)?;
                }
                Ok(())
            })
            .await??;
            let counted_by = Instant::now() + Duration::from_secs(10);
            let mut counted = agent.metric(REJECTED).await.unwrap_or(0.0) - before;
            while counted < FORGED as f64 && Instant::now() < counted_by {
                tokio::time::sleep(Duration::from_millis(100)).await;
                counted = agent.metric(REJECTED).await.unwrap_or(0.0) - before;
            }
            let rows = agent.metric("telemetry_agent_outbox_rows").await.unwrap_or(0.0);
            notes.push(format!(
                "{FORGED} forged acks: {counted} counted as rejected confirmations by the agent, outbox {rows} rows \
                 kept; {FORGED} forged echoes (ignored in ingest mode; dead-lettered by the server)"
            ));
            if counted < FORGED as f64 {
                fault_error = Some(format!("the agent counted {counted} of {FORGED} forged acks"));
            }
            tokio::time::sleep((fault_start + form.kill_gap).saturating_duration_since(Instant::now())).await;
            ingests[0].restart(START_WITHIN).await?;
        }
        Fault::OutboxRollback => {
            let dump = dir.join("outbox.sql");
            let (url, path) = (pg_url.clone(), dump.display().to_string());
            blocking(move || pg_tool_in("pg_dump", &url, &["-n", "edge_agent", "--clean", "--if-exists", "-f", &path]))
                .await??;
            tokio::time::sleep(form.kill_gap).await;
            let (url, path) = (pg_url.clone(), dump.display().to_string());
            let attempts = blocking(move || test_support::pg_restore(&url, &path).map_err(|e| anyhow!(e))).await??;
            // The agent sees it at its next commit (sensors keep sending).
            let seen_by = Instant::now() + Duration::from_secs(10);
            let mut rollbacks = 0.0;
            while rollbacks == 0.0 && Instant::now() < seen_by {
                tokio::time::sleep(Duration::from_millis(100)).await;
                rollbacks = agent.metric("telemetry_agent_outbox_rollbacks_total").await.unwrap_or(0.0);
            }
            notes.push(format!(
                "outbox restored from a {} s old dump (restore attempts: {attempts}; one that deadlocks with the \
                 agent is run again); the agent saw {rollbacks} rollback(s)",
                form.kill_gap.as_secs()
            ));
            if rollbacks == 0.0 {
                fault_error =
                    Some("the agent never saw the rollback: the scenario did not exercise its fault".to_owned());
            }
        }
        Fault::KillIngest | Fault::EndToEndKillIngest | Fault::SharedGroupKill | Fault::ClusterTwoIngest => {
            let victim = &mut ingests[0];
            let received = victim.metric("telemetry_ingest_received_readings_total").await.unwrap_or(0.0);
            let inserted = victim.metric("telemetry_ingest_inserted_readings_total").await.unwrap_or(0.0);
            notes.push(format!("victim had received {received} / inserted {inserted}"));
            victim.kill().await;
            tokio::time::sleep(form.kill_gap).await;
            victim.restart(START_WITHIN).await?;
        }
        Fault::BrokerRestart | Fault::PostgresRestart => {
            let p = private.clone().context("private service")?;
            blocking(move || p.stop()).await?;
            tokio::time::sleep(form.restart_pause).await;
            answering_at = Some(restart_private(private.clone().context("private service")?).await?);
        }
        Fault::CommandsDuringFault => {
            let p = private.clone().context("private service")?;
            blocking(move || p.stop()).await?;
            let send = |name: &'static str| {
                let (dir, host, port, prefix) = (dir.clone(), env.stack.mqtt_host.clone(), mqtt_port, prefix.clone());
                let client = client_id.to_owned();
                blocking(move || send_command(&dir, &host, port, &prefix, &client, name))
            };
            let paused = "telemetry_agent_intake_paused";
            send("pause_intake").await??;
            if !wait_metric(&agent, paused, |v| v == 1.0, Duration::from_secs(10)).await {
                fault_error = Some("pause_intake did not pause the agent".to_owned());
            }
            tokio::time::sleep(Duration::from_secs(COMMAND_PAUSE_SECS)).await;
            send("flush").await??;
            tokio::time::sleep(form.restart_pause).await;
            answering_at = Some(restart_private(private.clone().context("private service")?).await?);
            send("resume_intake").await??;
            let run = "telemetry_agent_commands_run_total";
            if !wait_metric(&agent, run, |v| v >= 3.0, Duration::from_secs(10)).await
                || !wait_metric(&agent, paused, |v| v == 0.0, Duration::from_secs(10)).await
            {
                fault_error = Some("the agent did not carry out all three commands".to_owned());
            }
            let rejected = agent.metric("telemetry_agent_commands_rejected_total").await.unwrap_or(0.0);
            let run = agent.metric(run).await.unwrap_or(0.0);
            notes.push(format!("commands carried out {run}, refused {rejected}"));
        }
        Fault::ClusterReplicaKill => {
            let victim = VICTIM_REPLICA;
            let node = cluster.as_ref().and_then(|c| c.nodes.iter().find(|n| n.name == victim)).context(victim)?;
            let local = format!("SELECT count() FROM `{database}`.readings_local");
            let held = crate::cluster::client(node).query(&local).fetch_one::<u64>().await.unwrap_or(0);
            let retries = ingests[0].metric(INSERT_RETRIES).await.unwrap_or(0.0);
            blocking(move || crate::cluster::stack("kill", victim)).await??;
            tokio::time::sleep(form.kill_gap).await;
            blocking(move || crate::cluster::stack("start", victim)).await??;
            answering_at = Some(Instant::now());
            notes.push(format!("{victim} held {held} readings at the SIGKILL"));
            replica_retries = Some(retries);
            if held == 0 {
                fault_error = Some(format!("{victim} held no reading: the scenario did not exercise its fault"));
            }
        }
        Fault::ClusterZookeeperRestart => {
            let ingest = &ingests[0];
            let retries_before = ingest.metric(INSERT_RETRIES).await.unwrap_or(0.0);
            let (mut last, mut last_at) = (ingest.metric(INSERTED).await.unwrap_or(0.0), Instant::now());
            let mut longest = Duration::ZERO;
            let pause = form.restart_pause;
            let mut restart = Box::pin(async move {
                blocking(|| crate::cluster::stack("stop", "zookeeper")).await??;
                tokio::time::sleep(pause).await;
                blocking(|| crate::cluster::stack("start", "zookeeper")).await??;
                anyhow::Ok(Instant::now())
            });
            let (mut answered, mut resumed) = (None, None);
            // Until the first reading inserted after ZooKeeper answered.
            while resumed.is_none() && answered.is_none_or(|a: Instant| a.elapsed() < ZK_RESUME_WITHIN) {
                tokio::select! {
                    done = &mut restart, if answered.is_none() => answered = Some(done?),
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                let inserted = ingest.metric(INSERTED).await.unwrap_or(last);
                if inserted > last {
                    longest = longest.max(last_at.elapsed());
                    (last, last_at) = (inserted, Instant::now());
                    resumed = answered.map(|a| last_at - a);
                }
            }
            let retries = ingest.metric(INSERT_RETRIES).await.unwrap_or(0.0) - retries_before;
            let down = answered.map_or(0.0, |a| (a - fault_start).as_secs_f64());
            notes.push(format!(
                "ZooKeeper stopped until it answered {down:.1} s; inserts paused {:.1} s (the longest time without \
                 a reading inserted), resumed {} after ZooKeeper answered; {retries} ClickHouse requests retried",
                longest.max(last_at.elapsed()).as_secs_f64(),
                resumed.map_or_else(|| "never".to_owned(), |r| format!("{:.1} s", r.as_secs_f64()))
            ));
            answering_at = answered;
            if resumed.is_none() {
                fault_error =
                    Some(format!("inserts did not resume within {ZK_RESUME_WITHIN:?} of ZooKeeper answering"));
            } else if retries == 0.0 {
                fault_error = Some("no insert was refused: the scenario did not exercise its fault".to_owned());
            }
        }
        Fault::EndToEndKillBroker | Fault::KillBroker => {
            let p = private.clone().context("private service")?;
            blocking(move || p.kill()).await?;
            tokio::time::sleep(form.restart_pause).await;
            answering_at = Some(restart_private(private.clone().context("private service")?).await?);
        }
        Fault::EchoAheadBound => {
            let p = private.clone().context("private service")?;
            blocking(move || p.kill()).await?;
            let (mut ahead_max, mut rows_max) = (0.0_f64, 0.0_f64);
            while fault_start.elapsed() < form.outage {
                ahead_max = ahead_max.max(agent.metric("telemetry_agent_echo_ahead_readings").await.unwrap_or(0.0));
                rows_max = rows_max.max(agent.metric("telemetry_agent_outbox_rows").await.unwrap_or(0.0));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            answering_at = Some(restart_private(private.clone().context("private service")?).await?);
            // The bound is checked before each publish; batches already in
            // flight may still be echoed: at most the window of them.
            let limit = (ECHO_AHEAD_MAX + ECHO_AHEAD_WINDOW * 2000) as f64;
            notes.push(format!(
                "ClickHouse down {} s: readings only in the broker peaked at {ahead_max} (bound {ECHO_AHEAD_MAX}, \
                 plus at most {ECHO_AHEAD_WINDOW} batches in flight), the outbox at {rows_max} rows",
                form.outage.as_secs()
            ));
            if ahead_max > limit {
                fault_error = Some(format!("{ahead_max} readings only in the broker, above {limit}"));
            } else if ahead_max < ECHO_AHEAD_MAX as f64 || rows_max <= ahead_max {
                fault_error =
                    Some("the bound was not reached, or the outbox did not take the rest: fault not exercised".into());
            }
        }
        Fault::BrokerDown | Fault::ClickhouseDown | Fault::QuotaReached | Fault::QuotaDropOldest => {
            let p = private.clone().context("private service")?;
            if fault == Fault::ClickhouseDown {
                // SIGKILL: a clean stop lets ClickHouse serve open keep-alive
                // connections for seconds while it shuts down, which blurs
                // the outage; a crash is crisp (and harsher).
                blocking(move || p.kill()).await?;
            } else {
                blocking(move || p.stop()).await?;
            }
            tokio::time::sleep((fault_start + form.outage).saturating_duration_since(Instant::now())).await;
            answering_at = Some(restart_private(private.clone().context("private service")?).await?);
        }
    }
    // The fault ends when the broken service accepts connections again (or
    // the killed daemon is ready again).
    let fault_end = answering_at.unwrap_or_else(Instant::now);
    let fault_duration = fault_end - fault_start;

    // --- recovery -------------------------------------------------------------------
    let mut resent = 0;
    for (emulator, stream) in emulators.into_iter().zip(&mut streams) {
        let done = emulator.finish(form.deadline).await?;
        stream.generated = done.generated;
        stream.acked = done.acked;
        resent += done.resent;
        if !done.success {
            notes.push(format!("emulator {} ended with {} of {} acked", stream.prefix, done.acked, done.generated));
        }
    }
    let load_done = fault_end.elapsed();
    let mut expected = Expected::new(&streams);
    // bad-clock-device: the readings ClickHouse refuses must be rejected
    // (checked below), not stored; so may the others of a batch that holds
    // one (the server isolates messages, not readings): the next
    // `batch_max_readings` (2,000) after the limit may go either way.
    let straddle_us = BAD_BATCH_READINGS * bad_ts_step;
    let (refused, excused) = if bad_clock {
        let refused = expected.excuse(|id| id.0 == BAD_CLIENT && id.2 < refused_before_us);
        (refused, refused + expected.excuse(|id| id.0 == BAD_CLIENT && id.2 < refused_before_us + straddle_us))
    } else {
        (0, 0)
    };
    let want = expected.obligations();
    let db = format!("`{database}`");
    let distinct_sql =
        format!("SELECT count() FROM (SELECT client_id, sensor, ts FROM {db}.readings GROUP BY client_id, sensor, ts)");
    let deadline = fault_end + form.deadline;
    let mut recovery = None;
    let mut progress = (0, Instant::now());
    loop {
        let stored = query_count(&ch, &distinct_sql).await.unwrap_or(0);
        let outbox = agent.metric("telemetry_agent_outbox_rows").await;
        if stored >= want && outbox == Some(0.0) {
            recovery = Some(fault_end.elapsed());
            break;
        }
        if stored != progress.0 {
            progress = (stored, Instant::now());
        }
        // Nothing left to send and nothing new stored for a long while: what
        // is missing will not come (no timing assertion: the oracle judges).
        if outbox == Some(0.0) && progress.1.elapsed() > Duration::from_secs(30) {
            notes.push(format!("stalled: {stored} of {want} stored, outbox empty, no progress for 30 s"));
            break;
        }
        if Instant::now() > deadline {
            notes.push(format!("not recovered: {stored} of {want} stored, outbox {outbox:?}"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The cluster: every replica's local table holds the same identities
    // (read on each node directly), before the oracle reads through the
    // Distributed tables.
    let mut convergence_problem = None;
    if let Some(c) = &cluster {
        let (note, problem) = crate::cluster::converge(c, &db, want, CONVERGE_WITHIN).await;
        notes.push(note);
        convergence_problem = problem;
        if let Some(before) = replica_retries {
            let after = ingests[0].metric(INSERT_RETRIES).await.unwrap_or(before);
            notes.push(format!("{} ClickHouse requests retried after the SIGKILL", after - before));
        }
    }
    // The materialised rollup follows the raw table by a pass or two: wait
    // until every marker is consumed (bounded), then judge both it and the
    // live view (which must be exact at any moment).
    let rollup_sql = format!("SELECT toUInt64(sum(count)) FROM {db}.readings_1m FINAL");
    let pending_sql = format!(
        "SELECT count() FROM (SELECT client_id FROM {db}.rollup_queue \
         GROUP BY client_id, minute, token HAVING sum(pending) > 0)"
    );
    let settle_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (d, r, p) = (
            query_count(&ch, &distinct_sql).await.unwrap_or(0),
            query_count(&ch, &rollup_sql).await.unwrap_or(0),
            query_count(&ch, &pending_sql).await.unwrap_or(u64::MAX),
        );
        if (d == r && p == 0) || Instant::now() > settle_deadline {
            if p != 0 {
                notes.push(format!("rollup markers still pending after 60 s: {p}"));
            } else if d != r {
                notes.push(format!("after 60 s the rollup counts {r} readings, the raw table holds {d}"));
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let stored: Vec<StoredReading> = ch
        .query(&format!(
            "SELECT client_id, sensor, ts, toUInt64(count()) AS copies, min(value), max(value) \
             FROM {db}.readings FINAL GROUP BY client_id, sensor, ts"
        ))
        .fetch_all()
        .await
        .context("read readings FINAL")?;
    let rollup: Vec<RollupRow> = ch
        .query(&format!("SELECT client_id, sensor, toUInt32(minute), count, sum, min, max FROM {db}.readings_1m FINAL"))
        .fetch_all()
        .await
        .context("read readings_1m FINAL")?;
    let live: Vec<RollupRow> = ch
        .query(&format!("SELECT client_id, sensor, toUInt32(minute), count, sum, min, max FROM {db}.readings_1m_live"))
        .fetch_all()
        .await
        .context("read readings_1m_live")?;
    let mut examples = Vec::new();
    let mut verdict = oracle::classify(&expected, &stored, &rollup, &mut examples);
    verdict.add_rollup_findings(&oracle::classify(&expected, &stored, &live, &mut examples));

    // --- counters and tear-down ------------------------------------------------------
    let agent_counter = |name: &'static str| {
        let agent = &agent;
        async move { agent.metric(name).await.unwrap_or(0.0) }
    };
    notes.push(format!("emulators resent {resent}"));
    notes.push(format!("agent replayed {}", agent_counter("telemetry_agent_readings_replayed_total").await));
    notes.push(format!("republished {} batches", agent_counter("telemetry_agent_batches_republished_total").await));
    let mut error = fault_error.or(convergence_problem);
    if recovery.is_none() && matches!(fault, Fault::OutboxRollback | Fault::AgentBeforeIngest | Fault::EchoAheadBound) {
        // These faults are about the agent recovering by itself: rows left
        // in its outbox would need a human (a restart) to go.
        error = error.or_else(|| Some("the agent's outbox did not drain by itself".to_owned()));
    }
    if matches!(fault, Fault::QuotaReached | Fault::QuotaDropOldest) {
        let held = agent_counter("telemetry_agent_quota_backpressure_total").await;
        let dropped = agent_counter("telemetry_agent_rows_dropped_total").await;
        notes.push(format!("back-pressure {held} times, dropped {dropped}"));
        if held == 0.0 && fault == Fault::QuotaReached {
            error = Some("the quota was never reached: the scenario did not exercise its fault".to_owned());
        }
    }
    if let Some((bad, pg, _)) = &mut bad_agent {
        // Its outbox must drain: rejected rows deleted, not republished forever.
        let drain_deadline = Instant::now() + Duration::from_secs(60);
        let mut outbox = bad.metric("telemetry_agent_outbox_rows").await;
        while outbox != Some(0.0) && Instant::now() < drain_deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            outbox = bad.metric("telemetry_agent_outbox_rows").await;
        }
        let agent_rejected = bad.metric("telemetry_agent_readings_rejected_by_ingest_total").await.unwrap_or(0.0);
        let ingest = &ingests[0];
        let server_rejected = ingest.metric("telemetry_ingest_rejected_readings_total").await.unwrap_or(0.0);
        let messages = ingest.metric("telemetry_ingest_rejected_messages_total").await.unwrap_or(0.0);
        let dead = query_count(
            &ch,
            &format!("SELECT count() FROM {db}.ingest_errors WHERE reason = 'insert_rejected' AND client_id = '{BAD_CLIENT}'"),
        )
        .await
        .unwrap_or(0);
        let refused_stored = query_count(
            &ch,
            &format!("SELECT count() FROM {db}.readings WHERE client_id = '{BAD_CLIENT}' AND ts < {refused_before_us}"),
        )
        .await
        .unwrap_or(u64::MAX);
        let gap = healthy_gap.unwrap_or(Duration::MAX);
        notes.push(format!(
            "{refused} acked readings of {BAD_CLIENT} are older than {BAD_REFUSED_DAYS} days ({excused} with the rest \
             of their batches): {server_rejected} readings \
             in {messages} messages rejected by the server ({dead} dead letters), {agent_rejected} counted by its \
             agent, {refused_stored} stored; its outbox {outbox:?}; healthy stream's longest wait for a stored \
             reading {:.1} s",
            gap.as_secs_f64()
        ));
        error = error.or_else(|| {
            if refused == 0 || messages == 0.0 || dead == 0 {
                Some("no reading was refused and rejected: the scenario did not exercise its fault".to_owned())
            } else if server_rejected < refused as f64 {
                Some(format!("{refused} refused readings, but the server rejected only {server_rejected}"))
            } else if refused_stored != 0 {
                Some(format!("{refused_stored} readings ClickHouse refuses are stored"))
            } else if outbox != Some(0.0) {
                Some(format!("{BAD_CLIENT}'s outbox did not drain ({outbox:?}): rejected rows still republished"))
            } else if gap > BAD_MAX_HEALTHY_GAP {
                Some(format!("the healthy stream waited {:.1} s for a stored reading", gap.as_secs_f64()))
            } else {
                None
            }
        });
        let _ = bad.terminate(Duration::from_secs(20)).await;
        test_support::drop_pg_database(&env.stack, pg).await;
    }
    if fault == Fault::OversizeFlood {
        let ingest = &ingests[0];
        let disconnects = ingest.metric("telemetry_ingest_mqtt_connection_errors_total").await.unwrap_or(-1.0);
        let dead = query_count(&ch, &format!("SELECT count() FROM {db}.ingest_errors")).await.unwrap_or(0);
        let (base, peak) = (flood_base_rss.unwrap_or(0), ingest.peak_rss_mib().unwrap_or(u64::MAX));
        notes.push(format!(
            "ingest: {dead} dead letters, {disconnects} broker disconnects, peak RSS {base} MiB before the flood, \
             {peak} MiB after"
        ));
        error = error.or_else(|| {
            if dead < FLOOD_MESSAGES {
                Some(format!("{dead} dead letters for {FLOOD_MESSAGES} garbage publishes"))
            } else if disconnects != 0.0 {
                Some(format!("the ingest server lost its broker connection {disconnects} times"))
            } else if peak > base + FLOOD_RSS_BOUND_MIB {
                Some(format!("peak RSS grew by {} MiB (bound {FLOOD_RSS_BOUND_MIB})", peak - base))
            } else {
                None
            }
        });
    }
    if let Some(reported) = stall_reported {
        let ingest = &ingests[0];
        let disconnects = ingest.metric("telemetry_ingest_mqtt_connection_errors_total").await.unwrap_or(-1.0);
        let stalls = ingest.metric("telemetry_ingest_insert_stalls_total").await.unwrap_or(0.0);
        let peak = ingest.peak_rss_mib();
        let rss = peak.map_or_else(|| "?".to_owned(), |m| m.to_string());
        notes.push(format!(
            "ingest: {disconnects} broker disconnects, {stalls} stalls counted, /healthz said stalled: {reported}, \
             peak RSS {rss} MiB"
        ));
        let stored_late = recovery.is_none_or(|r| r > STALL_RECOVERY);
        error = error.or_else(|| {
            if disconnects != 0.0 {
                Some(format!("the ingest server lost its broker connection {disconnects} times during the stall"))
            } else if !reported || stalls == 0.0 {
                Some("the stall was not reported (/healthz, insert_stalls)".to_owned())
            } else if peak.is_none_or(|m| m > STALL_RSS_BOUND_MIB) {
                Some(format!("peak RSS {rss} MiB over the bound of {STALL_RSS_BOUND_MIB} MiB"))
            } else if stored_late {
                Some(format!("not everything was stored within {} s of SIGCONT", STALL_RECOVERY.as_secs()))
            } else {
                None
            }
        });
    }
    if skewed {
        match clock_evidence(&ch, &format!("`{database}`"), &ingest_ids, &skews, &ingests).await {
            Ok((note, problem)) => {
                notes.push(note);
                error = error.or(problem);
            }
            Err(e) => error = Some(format!("cannot read the clock evidence: {e:#}")),
        }
    }
    let mut duplicates = 0.0;
    for ingest in &ingests {
        duplicates += ingest.metric("telemetry_ingest_duplicate_readings_total").await.unwrap_or(0.0);
    }
    notes.push(format!("ingest skipped {duplicates} duplicate readings"));
    let _ = agent.terminate(Duration::from_secs(20)).await;
    for ingest in &mut ingests {
        let _ = ingest.terminate(Duration::from_secs(20)).await;
    }
    if shared_pg {
        test_support::drop_pg_database(&env.stack, &pg_url).await;
    }
    if verdict.pass() && error.is_none() && !env.keep_data {
        let _ = ch.query(&format!("DROP DATABASE IF EXISTS {db}{on_cluster}")).execute().await;
    } else {
        notes.push(format!("data kept in ClickHouse database {database} ({ch_url})"));
    }
    if let Some(p) = private {
        blocking(move || drop(p)).await?;
    }
    if verdict.obligations == 0 {
        bail!("no reading was acked: the scenario proves nothing");
    }
    Ok(Outcome {
        fault,
        verdict: Some(verdict),
        error,
        recovery,
        fault_duration,
        load_done: Some(load_done),
        wall: Duration::ZERO,
        notes: notes.join("; "),
        examples,
    })
}

/// Starts the reliable emulator that emits `stream` to the agent listening
/// on `port`: `count` readings at `rate` per second.
fn start_emulator(
    env: &Env,
    dir: &std::path::Path,
    stream: &EmittedStream,
    port: u16,
    rate: u64,
    count: u64,
) -> Result<Emulator> {
    let spec = Spec::new(&format!("emulator-{}", stream.prefix), env.bins.join(stream.kind.name()), dir)
        .flag("connect", format!("tcp://127.0.0.1:{port}"))
        .flag("rate", rate)
        .flag("count", count)
        .flag("sensors", stream.sensors)
        .flag("prefix", &stream.prefix)
        .flag("frame", 50)
        .flag("seed", stream.seed)
        .flag("start-ts", stream.start_ts)
        .flag("ts-step", stream.ts_step)
        .arg("--reliable")
        .arg("--quiet")
        .env("RUST_LOG", "info");
    Emulator::start(spec)
}

/// Starts a stopped private instance again; returns when its port first
/// accepted a connection (the start command itself waits for more, e.g. a
/// query answered, and polls more slowly).
/// [`test_support::pg_tool`], its failure an error of this suite.
fn pg_tool_in(tool: &str, url: &str, args: &[&str]) -> Result<String> {
    test_support::pg_tool(tool, url, args).map_err(|e| anyhow!(e))
}

async fn restart_private(p: Arc<PrivateService>) -> Result<Instant> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], p.port));
    let mut restart = tokio::task::spawn_blocking(move || p.restart());
    let mut accepted = None;
    loop {
        tokio::select! {
            done = &mut restart => {
                done.map_err(|e| anyhow!("restart: {e}"))?;
                return Ok(accepted.unwrap_or_else(Instant::now));
            }
            () = tokio::time::sleep(Duration::from_millis(20)), if accepted.is_none() => {
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    accepted = Some(Instant::now());
                }
            }
        }
    }
}

async fn query_count(ch: &clickhouse::Client, sql: &str) -> Result<u64> {
    Ok(ch.query(sql).fetch_one::<u64>().await?)
}

/// The libfaketime preload library for skewed-clocks: `CHAOS_LIBFAKETIME`,
/// else where Debian's `libfaketime` (a dependency of `faketime`) puts it.
fn libfaketime() -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = match std::env::var_os("CHAOS_LIBFAKETIME") {
        Some(path) => vec![path.into()],
        None => vec![
            format!("/usr/lib/{}-linux-gnu/faketime/libfaketime.so.1", std::env::consts::ARCH).into(),
            "/usr/lib/faketime/libfaketime.so.1".into(),
            "/usr/local/lib/faketime/libfaketime.so.1".into(),
        ],
    };
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        anyhow!(
            "skewed-clocks runs one ingest server under libfaketime, which is not installed (tried {}): \
             `apt-get install faketime` (scripts/test does), or set CHAOS_LIBFAKETIME to the library",
            tried.join(", ")
        )
    })
}

/// The clock logs of skewed-clocks: materialised views recording, for every
/// row written to `rollup_queue` and to `readings_1m`, ClickHouse's clock at
/// the insert (the real one). The queue itself keeps no evidence: a consumed
/// marker's `+1` and `-1` rows sum to zero and merge away.
fn clock_log_ddl(db: &str) -> [String; 2] {
    [
        format!(
            "CREATE MATERIALIZED VIEW {db}.chaos_marker_log ENGINE = MergeTree() ORDER BY owner \
             AS SELECT owner, minute, marked_at, pending, now() AS seen_at FROM {db}.rollup_queue"
        ),
        format!(
            "CREATE MATERIALIZED VIEW {db}.chaos_fold_log ENGINE = MergeTree() ORDER BY minute \
             AS SELECT client_id, minute, count, now() AS seen_at FROM {db}.readings_1m"
        ),
    ]
}

/// One server's markers in the marker log.
#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct OwnerMarkers {
    owner: String,
    markers: u64,
    /// `marked_at` minus ClickHouse's clock at the insert, seconds.
    min_lag: i64,
    max_lag: i64,
}

/// How far (s) an ingest server's wall clock is off ours: the `now_ms` of
/// its `/api/health`.
async fn clock_skew(daemon: &Daemon) -> Result<i64> {
    let body = test_support::http::http_get(&daemon.http, "/api/health")
        .await
        .with_context(|| format!("{}: no answer from /api/health", daemon.spec.name))?;
    let now_ms: i64 = body
        .split_once("\"now_ms\":")
        .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|digits| digits.parse().ok())
        .with_context(|| format!("{}: no now_ms in /api/health: {body}", daemon.spec.name))?;
    let ours = i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis())?;
    Ok((now_ms - ours) / 1000)
}

/// What skewed-clocks must show besides a clean verdict, or it proved
/// nothing (the problems), and what it saw (the note). Checked: each server
/// ran with its clock (`skews`, from their APIs at start) and both stored
/// readings and wrote markers; rollup rows were written for minutes still
/// open by the real clock (only the skewed server closes them that early)
/// and for hours-late minutes; markers of the real-clock server consumed
/// while their minute was open (adopted by the peer) were at least
/// `rollup_orphan_secs` old by ClickHouse's clock, whatever the adopter's
/// clock said; and no marker of either server is left pending.
async fn clock_evidence(
    ch: &clickhouse::Client,
    db: &str,
    ids: &[String],
    skews: &[i64],
    ingests: &[Daemon],
) -> Result<(String, Option<String>)> {
    let (Some(real), Some(ahead)) = (ids.first(), ids.get(1)) else { bail!("skewed-clocks needs two ingest servers") };
    let mut notes = Vec::new();
    let mut problems = Vec::new();
    let markers: Vec<OwnerMarkers> = ch
        .query(&format!(
            "SELECT owner, toUInt64(count()) AS markers, min(toInt64(marked_at) - toInt64(seen_at)) AS min_lag, \
             max(toInt64(marked_at) - toInt64(seen_at)) AS max_lag \
             FROM {db}.chaos_marker_log WHERE pending > 0 GROUP BY owner"
        ))
        .fetch_all()
        .await
        .context("read the marker log")?;
    for (n, id) in [real, ahead].into_iter().enumerate() {
        let name = format!("ingest-{}", n + 1);
        let skew = skews.get(n).copied().unwrap_or_default();
        let inserted = ingests[n].metric("telemetry_ingest_inserted_readings_total").await.unwrap_or(-1.0);
        let folded = ingests[n].metric("telemetry_ingest_rollup_minutes_total").await.unwrap_or(-1.0);
        let (count, lag) = match markers.iter().find(|m| &m.owner == id) {
            Some(m) => (m.markers, format!("{:+}..{:+}", m.min_lag, m.max_lag)),
            None => (0, "-".to_owned()),
        };
        notes.push(format!(
            "{name}: clock {skew:+} s, inserted {inserted} readings, wrote {count} markers (marked_at {lag} s off \
             ClickHouse's clock at the insert), folded {folded} client-minutes"
        ));
        if inserted <= 0.0 || count == 0 {
            problems.push(format!("{name} stored no readings or wrote no marker"));
        }
    }
    let half = SKEW_SECS / 2;
    let ranges = |cond: String| {
        format!("SELECT toUInt64(count()) FROM {db}.ingested_ranges WHERE toInt64(inserted_at) - toInt64(now()) {cond}")
    };
    let ranges_ahead = query_count(ch, &ranges(format!("> {half}"))).await?;
    let ranges_real = query_count(ch, &ranges(format!("<= {half}"))).await?;
    notes.push(format!("ingested_ranges stamped {ranges_ahead} rows 2 h ahead, {ranges_real} on the real clock"));
    let folds = |cond: String| format!("SELECT toUInt64(count()) FROM {db}.chaos_fold_log WHERE {cond}");
    let early =
        query_count(ch, &folds(format!("toInt64(seen_at) < toInt64(minute) + {ROLLUP_AFTER_SECS_SKEWED}"))).await?;
    let late = query_count(ch, &folds(format!("toInt64(minute) < toInt64(seen_at) - {}", LATE_SECS / 2))).await?;
    notes.push(format!(
        "readings_1m rows written for minutes still open by the real clock {early}, for hours-late minutes {late}"
    ));
    if early == 0 {
        problems.push("no minute was folded while still open: the skewed clock decided nothing".to_owned());
    }
    if late == 0 {
        problems.push("no hours-late minute was folded".to_owned());
    }
    // The real-clock server consumes a minute's markers only once the minute
    // closed by its clock: a consumption of its marker while the minute was
    // open is the peer's adoption, which must wait `rollup_orphan_secs` by
    // ClickHouse's clock (both columns are ClickHouse's whole seconds).
    let adoptions = |cond: &str| {
        format!(
            "SELECT toUInt64(count()) FROM {db}.chaos_marker_log WHERE owner = ? AND pending < 0 \
             AND toInt64(minute) + {ROLLUP_AFTER_SECS_SKEWED} >= toInt64(seen_at){cond}"
        )
    };
    let adopted = ch.query(&adoptions("")).bind(real.as_str()).fetch_one::<u64>().await?;
    let early_adopted = ch
        .query(&adoptions(&format!(" AND toInt64(seen_at) - toInt64(marked_at) < {ORPHAN_SECS_SKEWED}")))
        .bind(real.as_str())
        .fetch_one::<u64>()
        .await?;
    notes.push(format!(
        "ingest-1 markers of open minutes adopted by ingest-2 {adopted}, of which younger than {ORPHAN_SECS_SKEWED} s \
         {early_adopted}"
    ));
    if adopted == 0 {
        problems.push("ingest-2 adopted no marker of an open minute".to_owned());
    }
    if early_adopted > 0 {
        problems.push(format!(
            "{early_adopted} markers adopted before they were {ORPHAN_SECS_SKEWED} s old: adoption followed the \
             skewed clock"
        ));
    }
    for (n, id) in [real, ahead].into_iter().enumerate() {
        let pending: u64 = ch
            .query(&format!(
                "SELECT toUInt64(count()) FROM (SELECT any(owner) AS o FROM {db}.rollup_queue \
                 GROUP BY client_id, minute, token HAVING sum(pending) > 0) WHERE o = ?"
            ))
            .bind(id.as_str())
            .fetch_one()
            .await
            .context("read the pending markers")?;
        if pending > 0 {
            problems.push(format!("{pending} markers of ingest-{} still pending", n + 1));
        }
    }
    let problem =
        (!problems.is_empty()).then(|| format!("skewed-clocks did not show what it must: {}", problems.join("; ")));
    Ok((notes.join("; "), problem))
}
