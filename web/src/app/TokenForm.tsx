import { useState, type FormEvent } from "react";

/** Asks once for a token with scope `read`; it is kept for this tab only. */
export function TokenForm({ onToken }: { onToken: (token: string) => void }) {
  const [value, setValue] = useState("");
  const submit = (event: FormEvent) => {
    event.preventDefault();
    const token = value.trim();
    if (token) onToken(token);
  };
  return (
    <main className="token-page">
      <form className="token-form" onSubmit={submit} aria-label="Token">
        <h1>Signalbox</h1>
        <p>
          Paste a token with scope <code>read</code> (<code>signalbox token create NAME --scope
          read</code>). It stays in this tab only and never goes into a URL.
        </p>
        <label htmlFor="token">Token</label>
        <input
          id="token"
          name="token"
          type="password"
          autoComplete="off"
          spellCheck={false}
          value={value}
          onChange={(e) => setValue(e.target.value)}
        />
        <button type="submit" disabled={!value.trim()}>Connect</button>
      </form>
    </main>
  );
}
