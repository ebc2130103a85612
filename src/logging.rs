//! Logging: `tracing-subscriber` lines on stderr, text or JSON, the level from
//! `ATCR_VERIFY_LOG` (`error`, `warn`, `info`, `debug`, `trace`).
//!
//! The server writes one line per request, tens of thousands a second under load. A write
//! to stderr per line (what `tracing-subscriber` does with `std::io::stderr`) cost a third
//! of a cached request's CPU time, so `serve` gathers lines in memory and one thread
//! writes them out, every [`FLUSH_EVERY`] or as soon as [`BATCH`] bytes wait. Written by
//! hand because `tracing-appender`'s worker wakes and writes per line, which is the cost
//! being avoided. Lines reach stderr in order; [`LogGuard`] writes what is left on exit.
//! The per-request line itself ([`request`]) is formatted straight into the batch, in the
//! subscriber's format, without going through `tracing`'s event machinery.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

/// The longest a line waits in memory.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Bytes waiting that wake the writer thread at once.
pub const BATCH: usize = 64 * 1024;
/// Bytes waiting past which a logging thread writes them itself (stderr is blocked or
/// slow): memory stays bounded and no line is dropped.
const MAX_WAITING: usize = 4 * 1024 * 1024;

/// Sets up logging at `default` level (unless `ATCR_VERIFY_LOG` says otherwise), one write
/// per line. For short-lived commands.
pub fn init(json: bool, default: tracing::Level) {
    install(json, default, std::io::stderr);
}

/// Sets up batched logging for the server; keep the guard until exit. Request lines
/// ([`request`]) go straight to the batch.
pub fn init_batched(json: bool, default: tracing::Level) -> LogGuard {
    let batched = Batched::start(Box::new(|lines| {
        // Nowhere to report a failed write to stderr.
        let _ = std::io::stderr().lock().write_all(lines);
    }));
    let level = install(json, default, Shared(Arc::clone(&batched)));
    let _ = REQUEST_LINES.set(Direct {
        batched: Arc::clone(&batched),
        json,
        enabled: level >= Level::INFO,
    });
    LogGuard(batched)
}

/// Installs the subscriber; returns the level it logs at.
fn install<W>(json: bool, default: tracing::Level, writer: W) -> Level
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let level = std::env::var("ATCR_VERIFY_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(default);
    let _ = tracing::subscriber::set_global_default(subscriber(json, level, writer));
    level
}

/// The subscriber: lines in the text ([`Text`]) or JSON format, up to `level`.
fn subscriber<W>(json: bool, level: Level, writer: W) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_timer(Rfc3339Micros)
        .with_writer(writer)
        .with_max_level(level)
        .with_target(false);
    if json {
        Box::new(builder.json().finish())
    } else {
        Box::new(builder.with_ansi(false).event_format(Text).finish())
    }
}

/// One provider request, as its log line gives it.
#[derive(Debug, Clone, Copy)]
pub struct RequestLine<'a> {
    /// `provide` or `mutate`.
    pub endpoint: &'a str,
    /// HTTP status answered.
    pub status: u16,
    /// Keys answered.
    pub keys: usize,
    /// Keys per outcome label, logged as `{verified: 2, error: 1}`.
    pub outcomes: &'a [(&'a str, usize)],
    /// The response's `systemError` (left out when empty).
    pub system_error: &'a str,
    /// Milliseconds taken.
    pub ms: u64,
}

/// Where [`request`] writes when the server logs batched.
static REQUEST_LINES: OnceLock<Direct> = OnceLock::new();

/// Logs one request at INFO: the line `tracing` would write for the event
/// `info!(endpoint, status, keys, outcomes = %outcomes, [system_error,] ms, "request")`.
///
/// The server writes one per request; under [`init_batched`] the line is formatted here
/// and handed to the batch, skipping `tracing`'s per-event dispatch and field visiting
/// (about a tenth of a cached request's CPU time). Otherwise it is that `tracing` event.
pub fn request(line: &RequestLine<'_>) {
    match REQUEST_LINES.get() {
        Some(direct) => direct.write(line),
        None => line.trace(),
    }
}

/// Request lines written straight into [`Batched`], in the subscriber's format.
struct Direct {
    batched: Arc<Batched>,
    json: bool,
    enabled: bool,
}

impl Direct {
    fn write(&self, line: &RequestLine<'_>) {
        if !self.enabled {
            return;
        }
        thread_local! {
            static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        BUFFER.with_borrow_mut(|buffer| {
            buffer.clear();
            line.write(buffer, self.json);
            self.batched.push(buffer);
        });
    }
}

impl RequestLine<'_> {
    fn trace(&self) {
        let RequestLine {
            endpoint,
            status,
            keys,
            outcomes,
            system_error,
            ms,
        } = *self;
        let outcomes = Outcomes(outcomes);
        if system_error.is_empty() {
            tracing::info!(endpoint, status, keys, outcomes = %outcomes, ms, "request")
        } else {
            tracing::info!(endpoint, status, keys, outcomes = %outcomes, system_error, ms, "request")
        }
    }

    /// The line as [`Text`] (`json: false`) or `tracing-subscriber`'s JSON format writes
    /// the event, a byte at a time rather than through `fmt`; strings escaped as those
    /// formats do (`Debug`, `serde_json`).
    fn write(&self, out: &mut Vec<u8>, json: bool) {
        let field = |out: &mut Vec<u8>, name: &str| {
            out.extend_from_slice(if json { b",\"" } else { b" " });
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(if json { b"\":" } else { b"=" });
        };
        let string = |out: &mut Vec<u8>, s: &str| {
            if json {
                let _ = serde_json::to_writer(&mut *out, s);
            } else {
                debug_str(out, s);
            }
        };
        if json {
            out.extend_from_slice(b"{\"timestamp\":\"");
            timestamp(out);
            out.extend_from_slice(b"\",\"level\":\"INFO\",\"fields\":{\"message\":\"request\"");
        } else {
            timestamp(out);
            out.extend_from_slice(b"  INFO request");
        }
        field(out, "endpoint");
        string(out, self.endpoint);
        field(out, "status");
        number(out, self.status.into());
        field(out, "keys");
        number(out, self.keys as u64);
        field(out, "outcomes");
        // A `Display` value: a string in JSON. Labels are identifiers, nothing to escape.
        let quote: &[u8] = if json { b"\"" } else { b"" };
        out.extend_from_slice(quote);
        Outcomes(self.outcomes).write(out);
        out.extend_from_slice(quote);
        if !self.system_error.is_empty() {
            field(out, "system_error");
            string(out, self.system_error);
        }
        field(out, "ms");
        number(out, self.ms);
        out.extend_from_slice(if json { b"}}\n" } else { b"\n" });
    }
}

/// Keys per outcome label: `{verified: 2, error: 1}`.
struct Outcomes<'a>(&'a [(&'a str, usize)]);

impl Outcomes<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        for (i, (label, n)) in self.0.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(label.as_bytes());
            out.extend_from_slice(b": ");
            number(out, *n as u64);
        }
        out.push(b'}');
    }
}

impl std::fmt::Display for Outcomes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = Vec::new();
        self.write(&mut out);
        f.write_str(&String::from_utf8_lossy(&out))
    }
}

fn number(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `s` as `{s:?}` writes it: quoted as is when it is printable ASCII without quotes or
/// backslashes (the common case, no `fmt` call), escaped by `Debug` otherwise.
fn debug_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
    {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = write!(out, "{s:?}");
    }
}

/// Appends the timestamp [`Rfc3339Micros`] writes.
fn timestamp(out: &mut Vec<u8>) {
    struct Bytes<'a>(&'a mut Vec<u8>);
    impl std::fmt::Write for Bytes<'_> {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0.extend_from_slice(s.as_bytes());
            Ok(())
        }
    }
    let _ = Rfc3339Micros.format_time(&mut Writer::new(&mut Bytes(out)));
}

/// The text line, as `tracing-subscriber`'s default format prints it without colours
/// (`2026-11-26T07:26:43.123456Z  INFO request endpoint="provide" status=200 …`; this
/// crate opens no spans), written with a fraction of its machinery: the server writes one
/// per request.
#[derive(Debug, Clone, Copy)]
struct Text;

impl<S, N> FormatEvent<S, N> for Text
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        Rfc3339Micros.format_time(&mut w)?;
        w.write_str(match *event.metadata().level() {
            Level::ERROR => " ERROR ",
            Level::WARN => "  WARN ",
            Level::INFO => "  INFO ",
            Level::DEBUG => " DEBUG ",
            Level::TRACE => " TRACE ",
        })?;
        let mut fields = Fields {
            w: &mut w,
            first: true,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        w.write_char('\n')
    }
}

/// Writes `message key=value …`; strings quoted and escaped (no line breaks from data).
struct Fields<'a, 'w> {
    w: &'a mut Writer<'w>,
    first: bool,
    result: std::fmt::Result,
}

impl Fields<'_, '_> {
    /// Writes the separator and `name=` (nothing for the message), then `value`.
    fn write(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> std::fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            if !std::mem::take(&mut self.first) {
                self.w.write_char(' ')?;
            }
            if field.name() != "message" {
                self.w.write_str(field.name())?;
                self.w.write_char('=')?;
            }
            value(self.w)
        })();
    }
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.write(field, |w| write!(w, "{value:?}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.write(field, |w| write!(w, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.write(field, |w| write!(w, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.write(field, |w| w.write_str(if value { "true" } else { "false" }));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.write(field, |w| write!(w, "{value:?}"));
    }
}

/// The timestamp of every line, as `tracing-subscriber`'s default prints it
/// (`2026-11-26T07:26:43.123456Z`), with the part up to the second formatted once per
/// second per thread instead of once per line (it was a tenth of a cached request's
/// logging cost).
#[derive(Debug, Clone, Copy)]
struct Rfc3339Micros;

impl FormatTime for Rfc3339Micros {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        thread_local! {
            static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
        }
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let secs = since.as_secs();
        SECOND.with_borrow_mut(|(second, prefix)| {
            if *second != secs {
                *second = secs;
                prefix.clear();
                let t = i64::try_from(secs)
                    .ok()
                    .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
                    .unwrap_or(OffsetDateTime::UNIX_EPOCH);
                let _ = write!(
                    prefix,
                    "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.",
                    t.year(),
                    u8::from(t.month()),
                    t.day(),
                    t.hour(),
                    t.minute(),
                    t.second()
                );
            }
            let micros = since.subsec_micros();
            let mut digits = [b'0'; 7];
            digits[6] = b'Z';
            let mut left = micros;
            for d in digits[..6].iter_mut().rev() {
                *d = b'0' + (left % 10) as u8;
                left /= 10;
            }
            w.write_str(prefix)?;
            // Seven ASCII bytes.
            w.write_str(std::str::from_utf8(&digits).unwrap_or("000000Z"))
        })
    }
}

/// Writes what is still waiting when dropped.
#[must_use = "dropping the guard is what writes the last lines"]
#[derive(Debug)]
pub struct LogGuard(Arc<Batched>);

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.0.flush();
    }
}

/// Where batches go (stderr; a buffer in tests).
type Sink = Box<dyn Fn(&[u8]) + Send + Sync>;

/// Lines waiting for the writer thread.
pub struct Batched {
    waiting: Mutex<Vec<u8>>,
    wake: Condvar,
    /// Held while writing to the sink, taken while holding `waiting` (never the other way
    /// round): batches reach the sink in the order they left `waiting`.
    writing: Mutex<()>,
    sink: Sink,
}

impl std::fmt::Debug for Batched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batched").finish_non_exhaustive()
    }
}

impl Batched {
    fn start(sink: Sink) -> Arc<Batched> {
        let batched = Arc::new(Batched {
            waiting: Mutex::default(),
            wake: Condvar::new(),
            writing: Mutex::default(),
            sink,
        });
        let writer = Arc::clone(&batched);
        let started = std::thread::Builder::new()
            .name("atcr-verify-log".into())
            .spawn(move || {
                loop {
                    let waiting = writer.lock();
                    let (mut waiting, _) = writer
                        .wake
                        .wait_timeout_while(waiting, FLUSH_EVERY, |w| w.len() < BATCH)
                        .unwrap_or_else(PoisonError::into_inner);
                    let lines = std::mem::take(&mut *waiting);
                    // Taken before the lines are let go of: a logging thread that must
                    // write inline (or a flush) waits for these lines to be out first.
                    let writing = writer.writing();
                    drop(waiting);
                    writer.write_out(&writing, &lines);
                }
            });
        if let Err(e) = started {
            eprintln!("atcr-verify: no log writer thread ({e}); logging unbatched");
        }
        batched
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes everything waiting now.
    pub fn flush(&self) {
        let mut waiting = self.lock();
        self.write_out(&self.writing(), &waiting);
        waiting.clear();
    }

    /// The right to write to the sink; lines are written in the order it is taken.
    fn writing(&self) -> MutexGuard<'_, ()> {
        self.writing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_out(&self, _writing: &MutexGuard<'_, ()>, lines: &[u8]) {
        if !lines.is_empty() {
            (self.sink)(lines);
        }
    }

    fn push(&self, line: &[u8]) {
        let mut waiting = self.lock();
        waiting.extend_from_slice(line);
        if waiting.len() >= MAX_WAITING {
            self.write_out(&self.writing(), &waiting);
            waiting.clear();
        } else if waiting.len() >= BATCH {
            self.wake.notify_one();
        }
    }
}

/// The writer of one event: its line, handed to [`Batched`] whole when dropped, so lines
/// never interleave however the formatter splits its writes.
#[derive(Debug)]
pub struct Line<'a> {
    batched: &'a Batched,
    line: Vec<u8>,
}

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.line.is_empty() && buf.ends_with(b"\n") {
            // A whole line in one write (what `tracing-subscriber` does): no copy.
            self.batched.push(buf);
        } else {
            self.line.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.batched.push(&self.line);
        }
    }
}

/// [`Batched`] as the subscriber's writer.
#[derive(Debug, Clone)]
struct Shared(Arc<Batched>);

impl<'a> MakeWriter<'a> for Shared {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line {
            batched: &self.0,
            line: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Batches = Arc<Mutex<Vec<Vec<u8>>>>;

    fn collecting() -> (Arc<Batched>, Batches) {
        let batches = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
        let sink = Arc::clone(&batches);
        let batched = Batched::start(Box::new(move |b| sink.lock().unwrap().push(b.to_vec())));
        (batched, batches)
    }

    #[test]
    fn lines_arrive_whole_in_order_batched_and_on_flush() {
        let (batched, batches) = collecting();
        let shared = Shared(Arc::clone(&batched));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        writeln!(
                            shared.make_writer(),
                            "thread {t} line {i:04} {}",
                            "x".repeat(40)
                        )
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        batched.flush();
        let batches = batches.lock().unwrap();
        assert!(
            batches.len() > 1 && batches.len() < 8000,
            "{} batches",
            batches.len()
        );
        let text = String::from_utf8(batches.concat()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 8000);
        for t in 0..4 {
            let mine: Vec<&str> = lines
                .iter()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .copied()
                .collect();
            assert_eq!(mine.len(), 2000, "thread {t}: lines lost or torn");
            for (i, line) in mine.iter().enumerate() {
                let expected = format!("thread {t} line {i:04} {}", "x".repeat(40));
                assert!(*line == expected, "thread {t}, line {i}: {line:?}");
            }
        }
    }

    #[test]
    fn text_lines_have_the_default_shape_and_strings_cannot_forge_lines() {
        let (batched, batches) = collecting();
        let subscriber = subscriber(false, Level::INFO, Shared(Arc::clone(&batched)));
        tracing::subscriber::with_default(subscriber, || {
            let outcomes = "{verified: 2}";
            tracing::info!(endpoint = "provide", status = 200u16, keys = 2usize, outcomes = %outcomes, "request");
            tracing::warn!(
                system_error = "x\n2026-01-01T00:00:00Z  INFO forged",
                "request"
            );
        });
        batched.flush();
        let text = String::from_utf8(batches.lock().unwrap().concat()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let (time, rest) = lines[0].split_at("2026-11-26T07:26:43.123456Z".len());
        crate::syntax::parse_datetime(time).unwrap();
        assert_eq!(
            rest,
            "  INFO request endpoint=\"provide\" status=200 keys=2 outcomes={verified: 2}"
        );
        assert!(
            lines[1]
                .ends_with("  WARN request system_error=\"x\\n2026-01-01T00:00:00Z  INFO forged\""),
            "{}",
            lines[1]
        );
    }

    /// The request line written directly is the line `tracing` writes for its event, in
    /// both formats, with and without a system error (timestamps aside).
    #[test]
    fn request_lines_are_the_lines_tracing_writes() {
        let outcomes = [("verified", 2), ("error", 1)];
        for system_error in [
            "",
            "deadline_exceeded: a:1 'single' \"quoted\"\nforged",
            "plain",
        ] {
            let line = RequestLine {
                endpoint: "provide",
                status: 200,
                keys: 3,
                outcomes: &outcomes,
                system_error,
                ms: 12,
            };
            for json in [false, true] {
                let (batched, batches) = collecting();
                let subscriber = subscriber(json, Level::INFO, Shared(Arc::clone(&batched)));
                tracing::subscriber::with_default(subscriber, || line.trace());
                batched.flush();
                let traced = String::from_utf8(batches.lock().unwrap().concat()).unwrap();
                let mut direct = Vec::new();
                line.write(&mut direct, json);
                let direct = String::from_utf8(direct).unwrap();
                let untimed = |l: &str| -> String {
                    let at = if json { "{\"timestamp\":\"".len() } else { 0 };
                    let (head, tail) = l.split_at(at);
                    let (time, rest) = tail.split_at("2026-11-26T07:26:43.123456Z".len());
                    crate::syntax::parse_datetime(time).unwrap_or_else(|e| panic!("{l}: {e}"));
                    format!("{head}<time>{rest}")
                };
                assert_eq!(untimed(&direct), untimed(&traced), "json: {json}");
                assert!(direct.ends_with('\n') && direct.lines().count() == 1);
                if json {
                    let parsed: serde_json::Value = serde_json::from_str(&direct).unwrap();
                    assert_eq!(parsed["fields"]["outcomes"], "{verified: 2, error: 1}");
                    assert_eq!(parsed["fields"]["status"], 200);
                }
            }
        }
    }

    /// With the sink blocked (stderr not drained), waiting lines stop growing at
    /// `MAX_WAITING`: the logging thread writes them itself, after the batch the writer
    /// thread holds, so nothing is lost or reordered. The guard writes what is left.
    #[test]
    fn a_blocked_sink_bounds_memory_keeps_order_and_the_guard_flushes() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::mpsc;

        let (blocked_tx, blocked_rx) = mpsc::channel::<()>();
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let gate = Mutex::new(Some((blocked_tx, gate_rx)));
        let batches: Batches = Arc::default();
        let seen = Arc::clone(&batches);
        let writers = Arc::new(Mutex::new(Vec::<String>::new()));
        let who = Arc::clone(&writers);
        let batched = Batched::start(Box::new(move |b| {
            let name = std::thread::current().name().unwrap_or("").to_owned();
            if name == "atcr-verify-log"
                && let Some((blocked, gate)) = gate.lock().unwrap().take()
            {
                // The writer thread's first batch: stuck until the test lets it go.
                blocked.send(()).unwrap();
                gate.recv().unwrap();
            }
            who.lock().unwrap().push(name);
            seen.lock().unwrap().push(b.to_vec());
        }));
        let line = |i: usize| format!("line {i:07} {}\n", "x".repeat(60));
        let total = (MAX_WAITING * 2) / line(0).len();
        let pushed = Arc::new(AtomicUsize::new(0));
        let pusher = {
            let (batched, pushed) = (Arc::clone(&batched), Arc::clone(&pushed));
            std::thread::Builder::new()
                .name("pusher".into())
                .spawn(move || {
                    for i in 0..total {
                        batched.push(line(i).as_bytes());
                        pushed.fetch_add(line(i).len(), Ordering::SeqCst);
                    }
                })
                .unwrap()
        };
        blocked_rx.recv().unwrap();
        // Once MAX_WAITING more has been pushed, the pusher must stop inside an inline
        // write, waiting for the stuck batch to go first.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while pushed.load(Ordering::SeqCst) < MAX_WAITING - line(0).len() {
            assert!(std::time::Instant::now() < deadline, "pusher stalled early");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(100));
        let before = pushed.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            pushed.load(Ordering::SeqCst),
            before,
            "the pusher went on: waiting lines grow past the bound"
        );
        gate_tx.send(()).unwrap();
        pusher.join().unwrap();
        batched.push(b"last words\n");
        drop(LogGuard(Arc::clone(&batched)));

        let text = String::from_utf8(batches.lock().unwrap().concat()).unwrap();
        let expected: String = (0..total)
            .map(line)
            .chain(["last words\n".into()])
            .collect();
        assert!(text == expected, "lines lost or out of order");
        let writers = writers.lock().unwrap();
        assert!(writers.iter().any(|w| w == "pusher"), "{writers:?}");
        for b in batches.lock().unwrap().iter() {
            assert!(b.len() < MAX_WAITING + 100, "a batch of {} bytes", b.len());
        }
    }

    #[test]
    fn a_quiet_line_is_written_within_the_flush_interval() {
        let (batched, batches) = collecting();
        writeln!(Shared(Arc::clone(&batched)).make_writer(), "alone").unwrap();
        let deadline = std::time::Instant::now() + FLUSH_EVERY * 40;
        while batches.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never written");
            std::thread::sleep(FLUSH_EVERY / 5);
        }
        assert_eq!(batches.lock().unwrap().concat(), b"alone\n");
    }
}

#[cfg(test)]
mod time_tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_with_microseconds_and_follow_the_clock() {
        let mut a = String::new();
        Rfc3339Micros.format_time(&mut Writer::new(&mut a)).unwrap();
        let parsed = crate::syntax::parse_datetime(&a).unwrap_or_else(|e| panic!("{a:?}: {e}"));
        assert!(
            (OffsetDateTime::now_utc() - parsed).abs() < time::Duration::seconds(2),
            "{a}"
        );
        assert_eq!(a.len(), "2026-11-26T07:26:43.123456Z".len(), "{a}");
        std::thread::sleep(Duration::from_millis(1100));
        let mut b = String::new();
        Rfc3339Micros.format_time(&mut Writer::new(&mut b)).unwrap();
        assert!(b > a, "a second later: {a} then {b}");
    }
}
