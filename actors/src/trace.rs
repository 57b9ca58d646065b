//! Trace context across actors and the bus: a span's context travels as a W3C `traceparent`
//! string (in messages, in events, in Kafka headers), and the receiving side's span continues it.
//! Without an OTLP exporter there is no valid context and all of this is a no-op.

use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The current span's context as a `traceparent`, when it is being traced.
pub fn current() -> Option<String> {
    of(&tracing::Span::current())
}

/// A span's context as a `traceparent`, when it is being traced.
pub fn of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return None;
    }
    let flags = if sc.is_sampled() { "01" } else { "00" };
    Some(format!("00-{}-{}-{flags}", sc.trace_id(), sc.span_id()))
}

/// Makes `span` a child of the context in `traceparent` (ignored when absent or malformed).
pub fn continue_from(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(sc) = traceparent.and_then(parse) {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
    }
}

/// A W3C `traceparent` (version 00) as a remote span context.
fn parse(tp: &str) -> Option<opentelemetry::trace::SpanContext> {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    let mut parts = tp.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let sc = SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, TraceState::default());
    sc.is_valid().then_some(sc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_and_malformed_ones_are_ignored() {
        let sc = parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(sc.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(sc.is_sampled() && sc.is_remote());
        for bad in [
            "",
            "00-xyz",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
        // No subscriber: nothing is traced, nothing to pass on.
        assert_eq!(current(), None);
    }
}
