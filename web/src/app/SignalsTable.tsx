import { useMemo, useState } from "react";
import { STATUSES, type SignalRow, type SignalStatus } from "../client";
import { useSignals } from "../react";
import { shortTime, type Zone } from "./format";

interface Filters {
  ticker: string;
  strategy: string;
  status: SignalStatus | "";
}

function matches(row: SignalRow, f: Filters): boolean {
  const has = (value: string | null, wanted: string) =>
    !wanted || (value ?? "").toLowerCase().includes(wanted.toLowerCase());
  return has(row.ticker, f.ticker.trim()) && has(row.strategy, f.strategy.trim())
    && (!f.status || row.status === f.status);
}

/** Live signals, newest first; filters apply to the rows held, "Load older" fetches more. */
export function SignalsTable({ zone, selected, onSelect }: {
  zone: Zone;
  selected: string | null;
  onSelect: (signalId: string, ticker: string | null) => void;
}) {
  const { rows, more, loading, error, loadOlder } = useSignals();
  const [filters, setFilters] = useState<Filters>({ ticker: "", strategy: "", status: "" });
  const shown = useMemo(() => rows.filter((r) => matches(r, filters)), [rows, filters]);
  const set = (change: Partial<Filters>) => setFilters((f) => ({ ...f, ...change }));

  return (
    <>
      <div className="filters" role="search">
        <input aria-label="Ticker" placeholder="Ticker" value={filters.ticker}
          onChange={(e) => set({ ticker: e.target.value })} />
        <input aria-label="Strategy" placeholder="Strategy" value={filters.strategy}
          onChange={(e) => set({ strategy: e.target.value })} />
        <select aria-label="Status" value={filters.status}
          onChange={(e) => set({ status: e.target.value as SignalStatus | "" })}>
          <option value="">Any status</option>
          {STATUSES.map((s) => <option key={s} value={s}>{s}</option>)}
        </select>
        <span className="count" data-testid="row-count">
          {shown.length} of {rows.length} signals held
        </span>
      </div>
      {error && <p className="error" role="alert">{error}</p>}
      <table className="signals-table" data-testid="signals">
        <thead>
          <tr>
            <th>Received</th><th>Ticker</th><th>Action</th><th>Strategy</th><th>Status</th>
            <th>Attempts</th><th>Claimed by</th><th>Last error</th>
          </tr>
        </thead>
        <tbody>
          {shown.map((row) => (
            <tr
              key={row.signal_id}
              data-signal-id={row.signal_id}
              data-status={row.status}
              className={row.signal_id === selected ? "selected" : undefined}
              aria-current={row.signal_id === selected || undefined}
              tabIndex={0}
              onClick={() => onSelect(row.signal_id, row.ticker)}
              onKeyDown={(e) => {
                if (e.key !== "Enter" && e.key !== " ") return;
                e.preventDefault(); // Space would scroll the page
                onSelect(row.signal_id, row.ticker);
              }}
            >
              <td title={row.received_at}>{shortTime(row.received_at, zone)}</td>
              <td className="clip ticker" title={row.ticker ?? undefined}>
                {row.ticker ?? "—"}
              </td>
              <td className={`action action-${row.action ?? "none"}`}>{row.action ?? "—"}</td>
              <td className="clip strategy" title={row.strategy ?? undefined}>
                {row.strategy ?? ""}
              </td>
              <td><span className={`status status-${row.status}`}>{row.status}</span></td>
              <td>{row.attempts || ""}</td>
              <td className="clip claimed-by" title={row.claimed_by ?? undefined}>
                {row.claimed_by ?? ""}
              </td>
              <td className="clip last-error" title={row.last_error ?? undefined}>
                {row.last_error ?? ""}
              </td>
            </tr>
          ))}
          {shown.length === 0 && (
            <tr><td colSpan={8} className="empty">No signals {rows.length ? "match" : "yet"}</td></tr>
          )}
        </tbody>
      </table>
      {more && (
        <button type="button" className="older" disabled={loading} onClick={() => void loadOlder()}>
          {loading ? "Loading…" : "Load older signals"}
        </button>
      )}
    </>
  );
}
