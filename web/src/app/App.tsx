import { useState } from "react";
import { ConnectionStatus, SignalboxProvider } from "../react";
import { PriceChart } from "./PriceChart";
import { SignalDetail } from "./SignalDetail";
import { SignalsTable } from "./SignalsTable";
import { TokenForm } from "./TokenForm";
import { forgetToken, loadToken, saveToken } from "./token";

export function App() {
  const [token, setToken] = useState<string | null>(loadToken);
  const [selected, setSelected] = useState<string | null>(null);
  const [chartTicker, setChartTicker] = useState<string | null>(null);

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
            selected={selected}
            onSelect={(id, ticker) => {
              setSelected(id);
              if (ticker) setChartTicker(ticker);
            }}
          />
        </section>
        <aside className="side">
          <PriceChart ticker={chartTicker} onTicker={setChartTicker} />
          {selected && <SignalDetail signalId={selected} onClose={() => setSelected(null)} />}
        </aside>
      </main>
    </SignalboxProvider>
  );
}
