// pocketlm in the browser: tokenizer, model and sampling, all from this folder (no other host is contacted).
//
//   import { load, generate } from "./pocketlm.js";
//   const text = await generate("ROMEO:", { max_new_tokens: 100, temperature: 0.8, onToken: (piece) => ... });
//
// Importing this module also sets window.pocketlm = { generate, load }. The model is an ONNX decoder with
// past key values (inputs input_ids, attention_mask, position_ids, past_key_values.{i}.key|value) run by
// onnxruntime-web on WebGPU when the browser offers a WebGPU adapter, else on WebAssembly (`backend`:
// "auto", "webgpu" or "wasm"); the runtime of the chosen backend is imported on demand, so a WASM visitor
// never downloads the WebGPU build. The tokenizer is the model's own tokenizer.json through
// @huggingface/tokenizers. Decoding mirrors pocketlm's Python engine exactly: the prompt's last
// `context_length` tokens are prefilled, and when the cache is full the last 3/4 of the window is prefilled
// again, so greedy output (temperature 0) equals `pocketlm generate --temperature 0` token for token.

import { Tokenizer } from "./runtime/tokenizers.min.mjs";

const HERE = new URL("./", import.meta.url);
// onnxruntime-web's builds, relative to this module: each loads its .wasm from its own folder
const RUNTIMES = { wasm: "runtime/wasm/ort.wasm.min.mjs", webgpu: "runtime/webgpu/ort.webgpu.min.mjs" };
const BACKENDS = ["auto", "webgpu", "wasm"];

async function fetchWithProgress(url, onProgress, label) {
  const res = await fetch(url);
  if (!res.ok) throw new Error(`pocketlm: cannot load ${url} (HTTP ${res.status})`);
  const total = Number(res.headers.get("Content-Length")) || 0;
  if (!res.body || !onProgress) return new Uint8Array(await res.arrayBuffer());
  const reader = res.body.getReader();
  const chunks = [];
  let loaded = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    loaded += value.length;
    onProgress({ file: label, loaded, total });
  }
  const out = new Uint8Array(loaded);
  let at = 0;
  for (const c of chunks) { out.set(c, at); at += c.length; }
  return out;
}

// A seeded generator (mulberry32) when a seed is given, so sampled runs can be repeated.
function rng(seed) {
  if (seed === undefined || seed === null) return Math.random;
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 0x1f, frac = h & 0x3ff;
  if (exp === 0) return sign * 2 ** -14 * (frac / 1024);
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * 2 ** (exp - 15) * (1 + frac / 1024);
}

function argmax(x) {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;  // first maximum, like numpy and torch
  return best;
}

// Temperature, top-k, top-p (the smallest set of tokens whose probability reaches top_p), then one draw.
export function sample(logits, { temperature = 0.8, top_k = 0, top_p = 1.0 } = {}, random = Math.random) {
  if (!(temperature > 0)) return argmax(logits);
  const V = logits.length;
  let order = Array.from({ length: V }, (_, i) => i).sort((a, b) => logits[b] - logits[a]);
  if (top_k > 0 && top_k < V) {
    const kth = logits[order[top_k - 1]];
    order = order.filter((i) => logits[i] >= kth);  // ties with the k-th survive, as in the Python engine
  }
  const m = logits[order[0]];
  let probs = order.map((i) => Math.exp((logits[i] - m) / temperature));
  let sum = probs.reduce((a, b) => a + b, 0);
  if (top_p < 1.0) {
    let cum = 0, keep = 0;
    while (keep < probs.length && cum / sum <= top_p) { cum += probs[keep]; keep++; }
    keep = Math.max(1, keep);
    order = order.slice(0, keep);
    probs = probs.slice(0, keep);
    sum = probs.reduce((a, b) => a + b, 0);
  }
  let r = random() * sum;
  for (let j = 0; j < order.length; j++) {
    r -= probs[j];
    if (r <= 0) return order[j];
  }
  return order[order.length - 1];
}

// Which backend runs `model` (pocketlm.json's model entry): { backend: "webgpu" | "wasm", note } (the note says
// why, for the page). "auto" takes WebGPU only where the browser hands out an adapter that can run the model;
// "webgpu" asked for where there is no adapter falls back to WASM too (the note says so) rather than leave the
// page dead.
export async function chooseBackend(requested = "auto", model = {}) {
  if (!BACKENDS.includes(requested)) {
    throw new Error(`pocketlm: unknown backend ${JSON.stringify(requested)}: use one of ${BACKENDS.join(", ")}`);
  }
  if (requested === "wasm") return { backend: "wasm", note: "WASM (asked for)" };
  if (model.webgpu === false) return { backend: "wasm", note: "WASM: exported without WebGPU (--no-webgpu)" };
  let adapter = null, why = "the browser offers no WebGPU adapter";
  if (typeof navigator === "undefined" || !navigator.gpu) {
    why = "this browser has no WebGPU";
  } else {
    try {
      adapter = await navigator.gpu.requestAdapter();
    } catch (e) {
      why = `the WebGPU adapter request failed (${e.message ?? e})`;
    }
  }
  if (!adapter) return { backend: "wasm", note: `WASM: ${why}` };
  if (model.kv_dtype === "float16" && !adapter.features.has("shader-f16")) {
    return { backend: "wasm", note: "WASM: this GPU lacks shader-f16, which the fp16 model needs" };
  }
  // onnxruntime's WebGPU provider has no int8 matmul (MatMulInteger, DynamicQuantizeLinear): a dynamically
  // quantized model would run its matmuls on the CPU anyway, with a GPU round trip around each one
  if (model.dtype === "q8" && requested === "auto") {
    return { backend: "wasm",
             note: "WASM: WebGPU has no kernels for this int8 model's matmuls (?backend=webgpu forces it)" };
  }
  return { backend: "webgpu", note: requested === "webgpu" ? "WebGPU (asked for)" : "WebGPU" };
}

const runtimes = {};  // backend -> the imported onnxruntime-web module, set up once
async function runtime(backend, threads) {
  if (!runtimes[backend]) {
    runtimes[backend] = import(new URL(RUNTIMES[backend], HERE).href).then((ort) => {
      // its .mjs/.wasm come from this folder, never a CDN; one thread is the fastest for small models and
      // needs no cross-origin isolation headers
      ort.env.wasm.wasmPaths = new URL(RUNTIMES[backend].replace(/[^/]*$/, ""), HERE).href;
      ort.env.wasm.numThreads = threads;
      return ort;
    });
  }
  return runtimes[backend];
}

async function createSession(backend, bytes, threads) {
  const ort = await runtime(backend, threads);
  // On WebGPU the outputs stay on the GPU ("gpu-buffer"): the cache (present.*) goes back in as the next step's
  // past without a round trip, and only the logits are read back. logSeverityLevel 3 (errors only): WebGPU
  // sessions otherwise log, as a console error, that shape ops run on the CPU, which is by design.
  const options = backend === "webgpu"
    ? { executionProviders: ["webgpu"], preferredOutputLocation: "gpu-buffer" } : { executionProviders: ["wasm"] };
  const session = await ort.InferenceSession.create(bytes, { ...options, graphOptimizationLevel: "all",
                                                              logSeverityLevel: 3 });
  return [ort, session];
}

export class PocketLM {
  constructor(ort, session, tokenizer, info, backend = "wasm", note = "WASM") {
    this.ort = ort;
    this.session = session;
    this.tokenizer = tokenizer;
    this.info = info;
    this.backend = backend;
    this.backendNote = note;
    this.window = info.context_length;
    this.eos = info.eos_token_id;
    this.pastNames = session.inputNames.filter((n) => n.startsWith("past_key_values."));
    this.lastStats = null;
  }

  // Feed `ids` after `past` (null = empty cache); returns [logits of the last position, new past].
  async forward(ids, past, pastLen) {
    const ort = this.ort;
    const T = ids.length;
    const feeds = {
      input_ids: new ort.Tensor("int64", BigInt64Array.from(ids, BigInt), [1, T]),
      attention_mask: new ort.Tensor("int64", new BigInt64Array(pastLen + T).fill(1n), [1, pastLen + T]),
      position_ids: new ort.Tensor("int64", BigInt64Array.from({ length: T }, (_, i) => BigInt(pastLen + i)), [1, T]),
    };
    for (const name of this.pastNames) {
      feeds[name] = past ? past[name] : new ort.Tensor(this.info.kv_dtype,
        this.info.kv_dtype === "float16" ? new Uint16Array(0) : new Float32Array(0), [1, this.info.kv_heads, 0, this.info.head_dim]);
    }
    const out = await this.session.run(feeds);
    const next = {};
    for (const name of this.pastNames) next[name] = out[name.replace("past_key_values.", "present.")];
    if (past) for (const name of this.pastNames) past[name].dispose();  // frees GPU buffers on WebGPU
    const V = out.logits.dims[2];
    const last = (await out.logits.getData(true)).subarray((T - 1) * V, T * V);  // read back (WebGPU), released
    // fp16 models: raw half-precision bits (Uint16Array) where the browser has no Float16Array
    return [last instanceof Uint16Array ? Float32Array.from(last, halfToFloat) : Float32Array.from(last), next];
  }

  encode(text) {
    const ids = this.tokenizer.encode(text, { add_special_tokens: false }).ids;
    if (ids.length) return ids;
    if (this.eos === null || this.eos === undefined) throw new Error("pocketlm: empty prompt and no end-of-text token");
    return [this.eos];  // an empty prompt starts from end-of-text: "the beginning of a document"
  }

  // Resolves to the continuation (without the prompt). temperature 0 is greedy.
  async generate(prompt, opts = {}) {
    const p = { ...this.info.sampling, ...opts };
    const max = p.max_new_tokens ?? 200;
    const stopAtEot = p.stop_at_eot ?? true;
    const random = rng(p.seed);
    const context = this.encode(prompt);
    const W = this.window;
    const t0 = performance.now();
    let pastLen = Math.min(context.length, W);
    let [logits, past] = await this.forward(context.slice(-W), null, 0);
    const tPrefill = performance.now();
    const out = [];
    let emitted = 0;
    let text = "";
    for (let i = 0; i < max; i++) {
      if (p.signal?.aborted) break;
      const tok = sample(logits, p, random);
      if (stopAtEot && tok === this.eos) break;
      out.push(tok);
      context.push(tok);
      text = this.tokenizer.decode(out, { skip_special_tokens: false });
      let safe = text.length;
      while (safe > emitted && text[safe - 1] === "\ufffd") safe--;  // an incomplete UTF-8 character
      if (safe > emitted && p.onToken) p.onToken(text.slice(emitted, safe), tok);
      emitted = Math.max(emitted, safe);
      if (i === max - 1) break;
      if (pastLen < W) {
        [logits, past] = await this.forward([tok], past, pastLen);
        pastLen += 1;
      } else {  // window full: keep the last 3/4 and prefill again (learned positions cannot shift)
        const keep = context.slice(-(W - Math.floor(W / 4)));
        for (const name of this.pastNames) past[name].dispose();
        [logits, past] = await this.forward(keep, null, 0);
        pastLen = keep.length;
      }
    }
    if (past) for (const name of this.pastNames) past[name].dispose();
    if (text.length > emitted && p.onToken) p.onToken(text.slice(emitted), null);
    const t1 = performance.now();
    this.lastStats = {
      prompt_tokens: Math.min(this.encode(prompt).length, W), new_tokens: out.length, token_ids: out,
      prefill_ms: tPrefill - t0, total_ms: t1 - t0,
      tokens_per_s: out.length > 1 ? (out.length - 1) / ((t1 - tPrefill) / 1000) : 0, backend: this.backend,
    };
    return text;
  }
}

// Load a model exported by `pocketlm export --format web` (by default the one this folder was built with).
// backend: "auto" (WebGPU when the browser has an adapter, else WASM), "webgpu" or "wasm".
export async function load({ base = HERE, onProgress = null, threads = 1, dtype = null, backend = "auto" } = {}) {
  base = new URL(base, HERE);
  if (!BACKENDS.includes(backend)) await chooseBackend(backend);  // a bad `backend` fails before any download
  const site = await (await fetch(new URL("pocketlm.json", base))).json();
  const info = { ...site.model, ...(dtype ? { file: site.model.files[dtype], dtype } : {}) };
  const chosen = await chooseBackend(backend, info);
  const modelDir = new URL(info.path, base);
  const [tj, tc] = await Promise.all(["tokenizer.json", "tokenizer_config.json"].map(
    async (f) => (await fetch(new URL(f, modelDir))).json()));
  const bytes = await fetchWithProgress(new URL(info.file, modelDir), onProgress, info.file);
  const tokenizer = new Tokenizer(tj, tc);
  if (chosen.backend === "webgpu") {
    // a model WebGPU cannot run (an operator or data type its kernels lack) falls back to WASM, saying why;
    // one short forward pass proves it runs (and compiles its shaders before the first timed token)
    let lm = null;
    try {
      const [ort, session] = await createSession("webgpu", bytes, threads);
      lm = new PocketLM(ort, session, tokenizer, info, "webgpu", chosen.note);
      const [, past] = await lm.forward([info.eos_token_id ?? 0], null, 0);
      for (const name of lm.pastNames) past[name].dispose();
      return lm;
    } catch (e) {
      await lm?.session.release();
      chosen.backend = "wasm";
      const why = String(e.message ?? e).split("Status Message: ").pop().split("\n")[0].slice(0, 200);
      chosen.note = `WASM: WebGPU could not run this model (${why})`;
    }
  }
  const [ort, session] = await createSession("wasm", bytes, threads);
  return new PocketLM(ort, session, tokenizer, info, "wasm", chosen.note);
}

// The default model (the one this folder was exported with), loaded once per backend asked for; without a
// backend, whichever was loaded first (the page's), else "auto".
const defaults = new Map();
let first = null;
export function ready({ onProgress = null, backend = null } = {}) {
  if (!backend && first) return first;
  backend ??= "auto";
  if (!defaults.has(backend)) defaults.set(backend, load({ onProgress, backend }));
  first ??= defaults.get(backend);
  return defaults.get(backend);
}

export async function generate(prompt, opts = {}) {
  const lm = await ready({ onProgress: opts.onProgress, backend: opts.backend });
  const text = await lm.generate(prompt, opts);
  api.lastStats = lm.lastStats;
  return text;
}

const api = { generate, load, ready, sample, chooseBackend, lastStats: null };
if (typeof window !== "undefined") window.pocketlm = api;
export default api;
