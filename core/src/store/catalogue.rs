//! The metric catalogue: every family the store holds, with its name, help,
//! type and labels, and the small enumerations stored as codes (worker kinds,
//! worker states, master signals, exit reasons). Names here are a contract,
//! documented in `docs/metrics.md`.

/// How a family's row is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Cell 0 is a counter.
    Counter,
    /// Buckets, `+Inf`, then the sum, with the given bucket bounds.
    Histogram(Buckets),
}

/// Which bucket bounds a histogram uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buckets {
    /// The configured duration buckets (seconds; stored as nanoseconds).
    Duration,
    /// Fixed byte-size buckets, [`SIZE_BUCKETS`].
    Size,
}

/// Byte-size histogram bounds.
pub const SIZE_BUCKETS: [f64; 9] = [
    64.0,
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
];

/// Default duration histogram bounds in seconds (Prometheus' defaults).
pub const DEFAULT_DURATION_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A family of series kept in the shared index.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `gpe_http_requests_total{method,route,status}`.
    HttpRequests = 0,
    /// `gpe_http_request_duration_seconds{method,route}`.
    HttpDuration = 1,
    /// `gpe_http_request_size_bytes`.
    HttpRequestSize = 2,
    /// `gpe_http_response_size_bytes`.
    HttpResponseSize = 3,
    /// `gpe_http_errors_total{method,route,kind}`.
    HttpErrors = 4,
    /// `gpe_worker_requests_total{worker}`.
    WorkerRequests = 5,
    /// `gpe_worker_connections_accepted_total{worker}`.
    WorkerAccepted = 6,
    /// CPU seconds of exited workers, by slot (nanoseconds; master only).
    WorkerCpuRetired = 7,
    /// `gpe_worker_request_duration_seconds{worker}`: each slot's request
    /// durations over every route.
    WorkerDuration = 8,
}

impl Family {
    /// Every family, in code order.
    pub const ALL: [Family; 9] = [
        Family::HttpRequests,
        Family::HttpDuration,
        Family::HttpRequestSize,
        Family::HttpResponseSize,
        Family::HttpErrors,
        Family::WorkerRequests,
        Family::WorkerAccepted,
        Family::WorkerCpuRetired,
        Family::WorkerDuration,
    ];

    /// The per-slot families: one series (one row) per worker slot each,
    /// not capped by `metrics_max_series`.
    pub const PER_SLOT: [Family; 4] = [
        Family::WorkerRequests,
        Family::WorkerAccepted,
        Family::WorkerCpuRetired,
        Family::WorkerDuration,
    ];

    /// The family with code `code`, if any.
    pub fn from_code(code: u8) -> Option<Family> {
        Self::ALL.get(code as usize).copied()
    }

    /// The code stored in index entries.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The exposed metric name (counters without the `_total` suffix).
    pub fn name(self) -> &'static str {
        match self {
            Family::HttpRequests => "gpe_http_requests",
            Family::HttpDuration => "gpe_http_request_duration_seconds",
            Family::HttpRequestSize => "gpe_http_request_size_bytes",
            Family::HttpResponseSize => "gpe_http_response_size_bytes",
            Family::HttpErrors => "gpe_http_errors",
            Family::WorkerRequests => "gpe_worker_requests",
            Family::WorkerAccepted => "gpe_worker_connections_accepted",
            Family::WorkerCpuRetired => "gpe_worker_cpu_seconds",
            Family::WorkerDuration => "gpe_worker_request_duration_seconds",
        }
    }

    /// One-line help text.
    pub fn help(self) -> &'static str {
        match self {
            Family::HttpRequests => "HTTP requests answered, by method, route and status",
            Family::HttpDuration => "Time from request head to response, by method and route",
            Family::HttpRequestSize => "Request body sizes in bytes",
            Family::HttpResponseSize => "Response body sizes in bytes",
            Family::HttpErrors => "Failed requests by method, route and kind",
            Family::WorkerRequests => "Requests served by each worker slot",
            Family::WorkerAccepted => "Connections accepted by each worker slot",
            Family::WorkerCpuRetired => "CPU seconds used by each worker slot",
            Family::WorkerDuration => {
                "Time from request head to response in each worker slot, over every route"
            }
        }
    }

    /// Label names, in the order values are stored.
    pub fn labels(self) -> &'static [&'static str] {
        match self {
            Family::HttpRequests => &["method", "route", "status"],
            Family::HttpDuration => &["method", "route"],
            Family::HttpRequestSize | Family::HttpResponseSize => &[],
            Family::HttpErrors => &["method", "route", "kind"],
            Family::WorkerRequests
            | Family::WorkerAccepted
            | Family::WorkerCpuRetired
            | Family::WorkerDuration => &["worker"],
        }
    }

    /// Whether the per-family series cap applies. Per-slot families are
    /// bounded by the number of slots instead.
    pub fn capped(self) -> bool {
        !Self::PER_SLOT.contains(&self)
    }

    /// How rows of this family are used.
    pub fn shape(self) -> Shape {
        match self {
            Family::HttpDuration | Family::WorkerDuration => Shape::Histogram(Buckets::Duration),
            Family::HttpRequestSize | Family::HttpResponseSize => Shape::Histogram(Buckets::Size),
            _ => Shape::Counter,
        }
    }
}

macro_rules! code_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $code:literal => $label:literal,)+ }) => {
        $(#[$doc])*
        #[repr(u32)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant = $code,)+
        }
        impl $name {
            /// Every value, in code order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];
            /// The stored code.
            pub fn code(self) -> u32 { self as u32 }
            /// The value with this code, if any.
            pub fn from_code(code: u32) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.code() == code)
            }
            /// The label value used in exposition.
            pub fn label(self) -> &'static str {
                match self { $($name::$variant => $label,)+ }
            }
        }
    };
}

code_enum!(
    /// The concurrency model of a worker.
    WorkerKind {
        /// One connection at a time.
        Sync = 1 => "sync",
        /// IO thread + pool of app threads.
        Thread = 2 => "thread",
        /// tokio current-thread event loop.
        Eventloop = 3 => "eventloop",
        /// smol lightweight tasks.
        Greenlet = 4 => "greenlet",
    }
);

code_enum!(
    /// The lifecycle state of a worker, exposed by `gpe_worker_state`.
    WorkerState {
        /// Forked, building its runtime and app.
        Booting = 0 => "booting",
        /// Serving, no request in progress.
        Idle = 1 => "idle",
        /// At least one request in progress.
        Busy = 2 => "busy",
        /// Asked to stop: finishing in-flight work, accepting no more.
        Draining = 3 => "draining",
    }
);

code_enum!(
    /// Signals the master counts in `gpe_master_signals_total`.
    MasterSignal {
        /// Reload.
        Hup = 0 => "HUP",
        /// Reopen logs.
        Usr1 = 1 => "USR1",
        /// Binary upgrade.
        Usr2 = 2 => "USR2",
        /// A child changed state.
        Chld = 3 => "CHLD",
        /// One worker more.
        Ttin = 4 => "TTIN",
        /// One worker fewer.
        Ttou = 5 => "TTOU",
        /// Graceful stop.
        Term = 6 => "TERM",
        /// Quick stop.
        Int = 7 => "INT",
        /// Quick stop.
        Quit = 8 => "QUIT",
        /// Stop workers, keep the master (as Gunicorn, when daemonized).
        Winch = 9 => "WINCH",
    }
);

code_enum!(
    /// Why a worker exited, counted in `gpe_master_worker_exits_total`.
    ExitReason {
        /// Died without being asked (signal or non-zero exit).
        Crash = 0 => "crash",
        /// Killed by the master for a stale heartbeat.
        Timeout = 1 => "timeout",
        /// Retired itself after `max_requests`.
        MaxRequests = 2 => "max_requests",
        /// Replaced by a reload.
        Reload = 3 => "reload",
        /// Removed by TTOU.
        ScaleDown = 4 => "scale_down",
        /// Stopped with the server.
        Shutdown = 5 => "shutdown",
        /// Its app factory failed.
        BootError = 6 => "boot_error",
        /// Retired for a resident set above `max_worker_memory`.
        Memory = 7 => "memory",
    }
);

code_enum!(
    /// The type of an app family (registered through the `metrics` facade).
    AppKind {
        /// Summed over every process, dead ones included.
        Counter = 1 => "counter",
        /// Merged over live processes by the family's [`GaugeMode`].
        Gauge = 2 => "gauge",
        /// Buckets, count and sum, summed like counters.
        Histogram = 3 => "histogram",
    }
);

code_enum!(
    /// How the gauges of one app family are merged over the live workers
    /// (config `[app_metrics.NAME] gauge = "..."`).
    GaugeMode {
        /// The sum over live workers (prometheus_client's `livesum`).
        Sum = 0 => "sum",
        /// The largest value of a live worker (`max`, of live ones only).
        Max = 1 => "max",
        /// The smallest value of a live worker (`min`, of live ones only).
        Min = 2 => "min",
        /// The value set most recently by any live worker.
        Latest = 3 => "latest",
        /// One series per worker slot, with a `worker` label (`all`).
        PerWorker = 4 => "per_worker",
    }
);

code_enum!(
    /// Why an app metric was refused, the `reason` of
    /// `gpe_metrics_rejected_total`.
    RejectReason {
        /// The metric name or a label name is not a valid Prometheus name
        /// (or there are too many labels).
        InvalidName = 0 => "invalid_name",
        /// The name starts with `gpe_`, which gpe's own families use.
        GpeCollision = 1 => "gpe_collision",
        /// The name is already used with another type.
        TypeClash = 2 => "type_clash",
        /// The store holds no more app families.
        TooManyFamilies = 3 => "too_many_families",
    }
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::layout::{MAX_BUCKETS, MAX_FAMILIES, MAX_REASONS, MAX_SIGNALS};

    #[test]
    fn codes_fit_the_layout() {
        assert!(Family::ALL.len() <= MAX_FAMILIES);
        assert!(MasterSignal::ALL.len() <= MAX_SIGNALS);
        assert!(ExitReason::ALL.len() <= MAX_REASONS);
        assert!(SIZE_BUCKETS.len() <= MAX_BUCKETS);
        assert!(DEFAULT_DURATION_BUCKETS.len() <= MAX_BUCKETS);
        for (i, f) in Family::ALL.iter().enumerate() {
            assert_eq!(f.code() as usize, i);
            assert_eq!(Family::from_code(i as u8), Some(*f));
        }
        for f in Family::ALL {
            assert_eq!(f.capped(), f.labels() != ["worker"], "{f:?}");
        }
        assert_eq!(WorkerState::from_code(2), Some(WorkerState::Busy));
        assert_eq!(MasterSignal::Chld.label(), "CHLD");
    }
}
