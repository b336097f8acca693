import { useEffect, useState } from "react";
import type { SignalTimeline } from "../client";
import { useSignalbox, useSignals } from "../react";
import { shortTime } from "./format";

/** One signal's whole timeline (`GET /api/signals/{id}`), read again as its row changes. */
export function SignalDetail({ signalId, onClose }: { signalId: string; onClose: () => void }) {
  const { api } = useSignalbox();
  const { rows } = useSignals();
  const version = rows.find((r) => r.signal_id === signalId)?.last_position ?? 0;
  const [timeline, setTimeline] = useState<SignalTimeline | null>(null);
  const [error, setError] = useState<string | null>(null);

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
            {timeline.signal.ticker} {timeline.signal.action}
          </p>
          {normalized && <pre className="json">{JSON.stringify(normalized, null, 2)}</pre>}
          {timeline.signal.errors && (
            <ul className="errors">
              {timeline.signal.errors.map((e, i) => (
                <li key={i}><code>{e.field ?? e.code}</code>: {e.message}</li>
              ))}
            </ul>
          )}
          <ol className="timeline" data-testid="timeline">
            {timeline.events.map((event) => (
              <li key={event.position} data-type={event.type}>
                <span className="position">#{event.position}</span>
                <span className="type">{event.type}</span>
                <time dateTime={event.time} title={event.time}>{shortTime(event.time)}</time>
                {"consumer" in event.data && event.data.consumer && (
                  <span className="consumer">by {String(event.data.consumer)}</span>
                )}
              </li>
            ))}
          </ol>
        </>
      )}
    </section>
  );
}
