//! `tracing` spans for the long operations (feature `tracing`): recovery,
//! checkpoints, merges, write stalls, backups and repairs, so that an
//! application's subscriber sees where time goes. Without the feature the
//! macros expand to nothing.

/// Enters an `info` span named `$name` with the given fields until the
/// returned guard drops.
macro_rules! span {
    ($name:literal $(, $($fields:tt)*)?) => {{
        #[cfg(feature = "tracing")]
        let guard = tracing::info_span!($name $(, $($fields)*)?).entered();
        #[cfg(not(feature = "tracing"))]
        let guard = $crate::trace::NoSpan;
        guard
    }};
}

/// Emits an `info` event in the current span.
macro_rules! event {
    ($($arguments:tt)*) => {
        #[cfg(feature = "tracing")]
        tracing::info!($($arguments)*);
    };
}

pub(crate) use {event, span};

/// What [`span!`] returns without the `tracing` feature.
#[cfg(not(feature = "tracing"))]
pub(crate) struct NoSpan;
