/** React bindings of the Signalbox web client. */

export { ConnectionStatus } from "./ConnectionStatus";
export {
  PAGE,
  SignalboxProvider,
  matcher,
  useEvents,
  useSignalbox,
  useSignals,
  type EventMatch,
  type SignalboxProviderProps,
  type SignalboxState,
  type SignalsState,
} from "./context";
