import {
  ColorType,
  LineSeries,
  createChart,
  createSeriesMarkers,
  type IChartApi,
  type ISeriesApi,
  type ISeriesMarkersPluginApi,
  type Time,
  type UTCTimestamp,
} from "lightweight-charts";
import { useEffect, useMemo, useRef, useState } from "react";
import type { SignalboxEvent } from "../client";
import { useSignalbox, useSignals } from "../react";
import { addPoints, chartData, pricePoint, type PricePoint } from "./points";

const HISTORY_PAGES = 5;
const MAX_POINTS = 5000;

/** The accepted signals of one ticker: their prices as a line, buys and sells as markers. */
export function PriceChart({ ticker, onTicker }: {
  ticker: string | null;
  onTicker: (ticker: string) => void;
}) {
  const { api, client } = useSignalbox();
  const { rows } = useSignals();
  const tickers = useMemo(
    () => [...new Set(rows.map((r) => r.ticker).filter((t): t is string => !!t))].sort(),
    [rows],
  );
  const shown = ticker ?? tickers[0] ?? null;
  const [points, setPoints] = useState<PricePoint[]>([]);
  const [error, setError] = useState<string | null>(null);

  useEffect(() => {
    setPoints([]);
    setError(null);
    if (shown === null) return;
    let current = true;
    const add = (events: SignalboxEvent[]) => {
      const fresh = events.map(pricePoint).filter((p): p is PricePoint => p !== null);
      if (fresh.length) setPoints((held) => addPoints(held, fresh, MAX_POINTS));
    };
    // Live first, so nothing falls between the history read and the subscription.
    const stop = client.on("signal.accepted", (event) => {
      if (event.data.signal.ticker === shown) add([event]);
    });
    // The history newest first: a ticker with years of signals costs the same few pages.
    void (async () => {
      let before = 0;
      try {
        for (let page = 0; page < HISTORY_PAGES && current; page++) {
          const found = await api.events({ order: "newest", before, limit: 1000,
            type: ["signal.accepted"], ticker: [shown] });
          if (current) add(found.events);
          if (found.events.length < 1000) break;
          before = found.next;
        }
      } catch (failure) {
        if (current) setError(failure instanceof Error ? failure.message : String(failure));
      }
    })();
    return () => {
      current = false;
      stop();
    };
  }, [api, client, shown]);

  return (
    <section className="chart-panel" aria-label="Price chart" data-testid="chart">
      <header>
        <h2>Signal prices</h2>
        <select aria-label="Chart ticker" value={shown ?? ""}
          onChange={(e) => onTicker(e.target.value)} disabled={!tickers.length}>
          {shown && !tickers.includes(shown) && <option value={shown}>{shown}</option>}
          {tickers.map((t) => <option key={t} value={t}>{t}</option>)}
        </select>
      </header>
      {error && <p className="error" role="alert">{error}</p>}
      <Chart points={points} />
      <p className="caption">
        <span data-testid="chart-points" data-newest={points[points.length - 1]?.position}>
          {points.length}
        </span> priced signals
        {shown ? ` of ${shown}` : ""}; ▲ buy, ▼ sell; times in UTC. Charts by{" "}
        <a href="https://www.tradingview.com/" target="_blank" rel="noreferrer">TradingView</a>{" "}
        Lightweight Charts.
      </p>
    </section>
  );
}

function Chart({ points }: { points: PricePoint[] }) {
  const box = useRef<HTMLDivElement>(null);
  const parts = useRef<{ chart: IChartApi; series: ISeriesApi<"Line">;
    markers: ISeriesMarkersPluginApi<Time> } | null>(null);

  useEffect(() => {
    if (!box.current) return;
    // The attribution logo injects a <style> element, which the page's CSP forbids:
    // the caption below the chart carries the attribution instead.
    const chart = createChart(box.current, {
      autoSize: true,
      layout: { attributionLogo: false, background: { type: ColorType.Solid, color: "#ffffff" },
        textColor: "#24292f" },
      timeScale: { timeVisible: true, secondsVisible: true },
    });
    const series = chart.addSeries(LineSeries, { color: "#0969da", lineWidth: 2 });
    const markers = createSeriesMarkers(series, []);
    parts.current = { chart, series, markers };
    return () => {
      parts.current = null;
      chart.remove();
    };
  }, []);

  useEffect(() => {
    const current = parts.current;
    if (!current) return;
    const { precision, line, markers } = chartData(points);
    current.series.applyOptions({ priceFormat: { type: "price", precision,
      minMove: Number(`1e-${precision}`) } });
    current.series.setData(line.map((p) => ({ time: p.time as UTCTimestamp, value: p.value })));
    current.markers.setMarkers(markers.map((m) => ({ ...m, time: m.time as UTCTimestamp })));
    if (line.length) current.chart.timeScale().fitContent();
  }, [points]);

  return <div className="chart" ref={box} />;
}
