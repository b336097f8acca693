import { useState } from "react";
import { ConnectionStatus, SignalboxProvider } from "../react";
import { PriceChart } from "./PriceChart";
import { SignalDetail } from "./SignalDetail";
import { SignalsTable } from "./SignalsTable";
import { TokenForm } from "./TokenForm";
import type { Zone } from "./format";
import { forgetToken, loadToken, saveToken } from "./token";
import { LOCAL_ZONE, loadZone, saveZone } from "./zone";

export function App() {
  const [token, setToken] = useState<string | null>(loadToken);
  const [selected, setSelected] = useState<string | null>(null);
  const [chartTicker, setChartTicker] = useState<string | null>(null);
  const [zone, setZone] = useState<Zone>(loadZone);

  if (token === null) {
    return (
      <TokenForm
        onToken={(value) => {
          saveToken(value);
          setToken(value);
        }}
      />
    );
  }

  return (
    <SignalboxProvider token={token} options={{ storageKey: "dashboard" }}>
      <header className="top">
        <h1>Signalbox</h1>
        <ConnectionStatus />
        <select className="zone" aria-label="Times" value={zone} onChange={(e) => {
          saveZone(e.target.value);
          setZone(e.target.value);
        }}>
          <option value="local">Times: local ({LOCAL_ZONE})</option>
          <option value="UTC">Times: UTC</option>
        </select>
        <button
          type="button"
          className="link"
          onClick={() => {
            forgetToken();
            setToken(null);
          }}
        >
          Change token
        </button>
      </header>
      <main className="layout">
        <section className="signals" aria-label="Signals">
          <SignalsTable
            zone={zone}
            selected={selected}
            onSelect={(id, ticker) => {
              setSelected(id);
              if (ticker) setChartTicker(ticker);
            }}
          />
        </section>
        <aside className="side">
          <PriceChart ticker={chartTicker} onTicker={setChartTicker} />
          {selected && <SignalDetail signalId={selected} zone={zone} onClose={() => setSelected(null)} />}
        </aside>
      </main>
    </SignalboxProvider>
  );
}
