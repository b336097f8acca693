import { useEffect, useState } from "react";
import { signalIdOf, type SignalboxEvent, type SignalTimeline } from "../client";
import { useSignalbox } from "../react";
import { eventView } from "./eventView";
import { shortTime, showControls, type Zone } from "./format";

/**
 * One signal's whole timeline (`GET /api/signals/{id}`), read again after each of its events
 * on the stream: whether or not the table still holds its row (it keeps only the newest).
 */
export function SignalDetail({ signalId, zone, onClose }: {
  signalId: string;
  zone: Zone;
  onClose: () => void;
}) {
  const { api, client } = useSignalbox();
  const [version, setVersion] = useState(0);
  const [timeline, setTimeline] = useState<SignalTimeline | null>(null);
  const [error, setError] = useState<string | null>(null);

  useEffect(() => client.on("*", (event) => {
    if (signalIdOf(event) === signalId) setVersion(event.position);
  }), [client, signalId]);

  useEffect(() => {
    let current = true;
    api.signal(signalId).then(
      (found) => { if (current) { setTimeline(found); setError(null); } },
      (failure: unknown) => { if (current) setError(failure instanceof Error ? failure.message : String(failure)); },
    );
    return () => { current = false; };
  }, [api, signalId, version]);

  const normalized = timeline?.signal.normalized;
  return (
    <section className="detail-panel" aria-label="Signal detail" data-testid="detail">
      <header>
        <h2>Signal {signalId.slice(0, 8)}</h2>
        <button type="button" className="link" onClick={onClose}>Close</button>
      </header>
      {error && <p className="error" role="alert">{error}</p>}
      {timeline && (
        <>
          <p>
            <span className={`status status-${timeline.status}`}>{timeline.status}</span>{" "}
            {showControls(timeline.signal.ticker ?? "")} {timeline.signal.action}
          </p>
          {normalized && <pre className="json">{showControls(JSON.stringify(normalized, null, 2))}</pre>}
          {timeline.signal.errors && (
            <ul className="errors">
              {timeline.signal.errors.map((e, i) => (
                <li key={i}><code>{e.field ?? e.code}</code>: {showControls(e.message)}</li>
              ))}
            </ul>
          )}
          <ol className="timeline" data-testid="timeline">
            {timeline.events.map((event) => (
              <li key={event.position} data-type={event.type}>
                <div className="event-head">
                  <span className="position">#{event.position}</span>
                  <span className="type">{event.type}</span>
                  <time dateTime={event.time} title={event.time}>{shortTime(event.time, zone)}</time>
                </div>
                <EventData event={event} />
              </li>
            ))}
          </ol>
          {timeline.truncated && (
            <p className="caption" data-testid="timeline-cut">
              Its first {timeline.events.length} events only: the signal has more, listed by{" "}
              <code>GET /api/events?stream=signal-{signalId}</code>.
            </p>
          )}
        </>
      )}
    </section>
  );
}

/** An event's key facts, a failure's reason in full, and all of its data as JSON, folded
 * (written out only when opened: a timeline may hold 10,000 events). */
function EventData({ event }: { event: SignalboxEvent }) {
  const [open, setOpen] = useState(false);
  const { facts, reason } = eventView(event);
  return (
    <>
      {facts.length > 0 && (
        <dl className="facts">
          {facts.map((fact, i) => (
            <div key={i}><dt>{showControls(fact.label)}</dt><dd>{showControls(fact.value)}</dd></div>
          ))}
        </dl>
      )}
      {reason !== null && <p className="reason">{showControls(reason)}</p>}
      <details className="data" onToggle={(e) => setOpen(e.currentTarget.open)}>
        <summary>data</summary>
        {open && <pre className="json">{showControls(JSON.stringify(event.data, null, 2))}</pre>}
      </details>
    </>
  );
}
