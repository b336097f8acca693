import react from "@vitejs/plugin-react";
import { defineConfig } from "vite";

// The dashboard builds into the Python package, which serves it at "/" (pipeline/dashboard.py).
// The output must depend only on the sources and the locked packages: `make test` rebuilds it
// and compares with the committed files.
export default defineConfig({
  plugins: [react()],
  base: "/",
  build: {
    outDir: "../pipeline/static",
    emptyOutDir: true,
    assetsDir: "assets",
    sourcemap: false,
    modulePreload: { polyfill: false },
    chunkSizeWarningLimit: 1000,
  },
  test: {
    include: ["test/**/*.test.ts"],
    environment: "node",
  },
});
