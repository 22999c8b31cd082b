// Talking to the replicas (openapi.yaml): the page's own /config.json says where they are (one
// pair, or several); GET /v1/model on both replicas of a pair (they must agree on the model);
// POST /v1/predict to both at once with the same request id (in the body and in X-Request-Id),
// one share each; reconstruct the label from the two answers. With several pairs, requests take
// turns and a pair that is down or unready is skipped (`PairedClient`), as clients/privdigit
// does. Errors become `ServiceProblem`s whose `message` is written for people.

import {
  LABEL_SHARINGS,
  ProtocolError,
  decodeTensor,
  encodeFixed,
  encodeTensor,
  newRequestId,
  reconstructLabels,
  share,
} from "./sharing.js";

export const CLASSES = 10;
export const INPUT_SHAPE = [1, 1, 28, 28];
export const TIMEOUT_MS = 30000;
const START_HINT = "Is the cluster running? Start it with “python -m service up”, then try again.";

/**
 * A problem talking to the replicas. `kind` is one of unreachable, version_mismatch, service,
 * bad_response, config; `code` is the replica's error code for kind "service".
 */
export class ServiceProblem extends Error {
  constructor(kind, message, { party = null, code = null, status = null, detail = null } = {}) {
    super(message);
    this.name = "ServiceProblem";
    this.kind = kind;
    this.party = party;
    this.code = code;
    this.status = status;
    this.detail = detail;
  }
}

const name = (party, url) => `Replica ${party} (${url})`;

/** What a person should read for a replica's `{"error": {code, message}}` answer. */
function serviceMessage(party, url, status, code, message) {
  const who = name(party, url);
  const said = message ? ` It said: “${message}”` : "";
  switch (code) {
    case "busy":
      return `The replicas are busy with other requests right now. Wait a few seconds and try again.`;
    case "not_ready":
      return `${who} is not ready yet: it is still loading its share of the model or waiting for the other replica. Try again in a moment.${said}`;
    case "dealer_unavailable":
      return `The replicas cannot reach the dealer that supplies their one-time randomness, so they cannot compute. Check that the dealer is running (“python -m service up” starts it).${said}`;
    case "peer_timeout":
    case "peer_error":
      return `The two replicas could not finish the computation together: the other replica stopped answering ${who.toLowerCase()}. One of them may be down or restarting; try again in a moment.${said}`;
    case "model_version_mismatch":
      return `The replicas switched to a new model while this request was on its way. Try again.`;
    case "replayed_request":
      return `${who} had already seen this request id, so it refused to compute again. Try again (the page makes a fresh id).`;
    case "payload_too_large":
    case "batch_too_large":
      return `${who} refused the request as too large.${said}`;
    case "scores_disabled":
      return `${who} does not give out scores; this page asks only for labels.${said}`;
    default:
      return `${who} refused the request (${status} ${code}).${said}`;
  }
}

/** The problem to report from both replicas' outcomes: the likeliest root cause first. */
export function firstProblem(errors) {
  const rank = (e) => {
    if (e instanceof ServiceProblem && e.kind === "unreachable") return 0;
    if (e instanceof ServiceProblem && e.kind === "service" && !String(e.code).startsWith("peer_")) return 1;
    return e instanceof ServiceProblem ? 2 : 3;
  };
  const found = errors.filter((e) => e);
  found.sort((a, b) => rank(a) - rank(b));
  return found[0] ?? null;
}

/** The model both replicas serve, after checking their parties, versions and fixed point agree. */
export function checkModels(urls, infos) {
  const parties = [];
  const versions = [];
  const fracs = [];
  const batches = [];
  infos.forEach((info, p) => {
    const fp = info && typeof info.fixed_point === "object" ? info.fixed_point : null;
    const frac = fp ? fp.frac_bits : null;
    const ring = fp ? (fp.ring_bits ?? 64) : null;
    const ok =
      info &&
      (info.serving_version === null || info.serving_version === undefined || typeof info.serving_version === "string") &&
      (info.party === 0 || info.party === 1) &&
      typeof info.model_version === "string" &&
      info.model_version &&
      Number.isInteger(frac) &&
      frac >= 0 &&
      frac <= 30 &&
      ring === 64 &&
      Number.isInteger(info.max_batch) &&
      info.max_batch >= 1;
    if (!ok) {
      throw new ServiceProblem("bad_response", `${name(p, urls[p])} sent a malformed description of its model.`, {
        party: p,
      });
    }
    parties.push(info.party);
    versions.push(info.model_version);
    fracs.push(frac);
    batches.push(info.max_batch);
  });
  if (parties[0] === 1 && parties[1] === 0) {
    throw new ServiceProblem(
      "config",
      `The page is set up with the replicas swapped: ${urls[0]} is replica 1 and ${urls[1]} is replica 0. The operator should list replica 0 first.`,
    );
  }
  if (parties[0] !== 0 || parties[1] !== 1) {
    throw new ServiceProblem(
      "config",
      `Both servers say they are replica ${parties[0]}; the page needs replica 0 and replica 1.`,
    );
  }
  const serving = infos[0].serving_version;
  if (!serving && versions[0] !== versions[1]) {
    throw new ServiceProblem(
      "version_mismatch",
      `The two replicas are serving different versions of the model (replica 0: ${versions[0]}, replica 1: ${versions[1]}), so their answers would not fit together. This usually clears up when a model update finishes; try again in a moment.`,
      { detail: versions },
    );
  }
  if (fracs[0] !== fracs[1]) {
    throw new ServiceProblem(
      "version_mismatch",
      `The two replicas use different number formats (fixed point with ${fracs[0]} and ${fracs[1]} fractional bits), so their answers would not fit together.`,
    );
  }
  return { version: serving || versions[0], fracBits: fracs[0], maxBatch: Math.min(...batches), info: infos[0] };
}

/** The replica pairs (each [party 0's URL, party 1's]) from the page's own /config.json. */
export async function loadConfig() {
  let body;
  try {
    const response = await fetch("config.json", { cache: "no-store" });
    body = await response.json();
  } catch {
    throw new ServiceProblem("config", "The page could not load its configuration (config.json). Reload the page.");
  }
  const listed = body && Array.isArray(body.pairs) ? body.pairs : body ? [body.replicas] : [];
  const pairs = listed.map((pair) => (Array.isArray(pair) ? pair.map((u) => String(u).replace(/\/+$/, "")) : []));
  if (!pairs.length || pairs.some((urls) => urls.length !== 2)) {
    throw new ServiceProblem("config", "The page's configuration does not name two replicas.");
  }
  return pairs;
}

/** True when another pair may well answer where this one failed (never for a 4xx about the input). */
export function retryable(err) {
  if (!(err instanceof ServiceProblem)) return false;
  if (err.kind === "unreachable" || err.kind === "version_mismatch") return true;
  if (err.kind === "service") return err.status >= 500 || RETRY_CODES.includes(err.code);
  return err.kind === "bad_response" && err.status >= 500;
}
const RETRY_CODES = ["busy", "model_version_mismatch", "request_timeout"];
export const COOLDOWN_MS = 5000; // a pair that failed is tried last for this long

export class ReplicaClient {
  constructor(urls, { timeoutMs = TIMEOUT_MS } = {}) {
    this.urls = urls;
    this.timeoutMs = timeoutMs;
    this.model = null;
  }

  /** GET (no body) or POST `path` on one replica; its JSON answer, or a `ServiceProblem`. */
  async call(party, path, body = null) {
    const url = this.urls[party];
    const init = { method: body === null ? "GET" : "POST", mode: "cors", credentials: "omit", cache: "no-store" };
    if (body !== null) {
      init.headers = { "content-type": "application/json" };
      if (typeof body.request_id === "string") init.headers["x-request-id"] = body.request_id;
      init.body = JSON.stringify(body);
    }
    init.signal = AbortSignal.timeout(this.timeoutMs);
    let response;
    try {
      response = await fetch(url + path, init);
    } catch (err) {
      const timedOut = err && (err.name === "TimeoutError" || err.name === "AbortError");
      const why = timedOut
        ? `did not answer within ${this.timeoutMs / 1000} seconds`
        : "cannot be reached: it may be down or restarting (or it does not allow requests from this page)";
      throw new ServiceProblem("unreachable", `${name(party, url)} ${why}. ${START_HINT}`, { party, detail: String(err) });
    }
    let json = null;
    try {
      json = await response.json();
    } catch {
      json = null;
    }
    if (!response.ok) {
      const err = json && typeof json === "object" ? json.error : null;
      if (err && typeof err.code === "string" && typeof err.message === "string") {
        const message = err.message.split(/\s+/).join(" ");
        throw new ServiceProblem("service", serviceMessage(party, url, response.status, err.code, message), {
          party,
          code: err.code,
          status: response.status,
          detail: message,
        });
      }
      throw new ServiceProblem(
        "bad_response",
        `${name(party, url)} answered with an error (HTTP ${response.status}) that it did not explain. Is that address really a privdigit replica?`,
        { party, status: response.status },
      );
    }
    if (!json || typeof json !== "object" || Array.isArray(json)) {
      throw new ServiceProblem("bad_response", `${name(party, url)} answered something that is not a privdigit reply.`, {
        party,
      });
    }
    return json;
  }

  /** The same call on both replicas concurrently: both answers, or the likeliest problem. */
  async both(path, bodies = [null, null]) {
    const outcomes = await Promise.allSettled([0, 1].map((p) => this.call(p, path, bodies[p])));
    const problem = firstProblem(outcomes.map((o) => (o.status === "rejected" ? o.reason : null)));
    if (problem) throw problem;
    return outcomes.map((o) => o.value);
  }

  /** The model both replicas agree on (cached; `refresh` asks again). */
  async getModel(refresh = false) {
    if (!this.model || refresh) this.model = checkModels(this.urls, await this.both("/v1/model"));
    return this.model;
  }

  /**
   * Classify one MNIST-style input (784 values in [0, 1]): encode it in fixed point, split it
   * into two fresh shares, post one to each replica, reconstruct the label from the answers.
   */
  async predict(x) {
    for (const attempt of [0, 1]) {
      const model = await this.getModel(attempt === 1);
      const fixed = encodeFixed(x, model.fracBits);
      const [s0, s1] = share(fixed);
      const requestId = newRequestId();
      const base = { request_id: requestId, output: "label", model_version: model.version };
      const bodies = [
        { ...base, input: encodeTensor(s0, INPUT_SHAPE) },
        { ...base, input: encodeTensor(s1, INPUT_SHAPE) },
      ];
      const start = performance.now();
      let answers;
      try {
        answers = await this.both("/v1/predict", bodies);
      } catch (err) {
        if (err instanceof ServiceProblem && err.code === "model_version_mismatch" && attempt === 0) continue;
        if (err instanceof ServiceProblem && err.kind !== "service") this.model = null;
        throw err;
      }
      const latencyMs = performance.now() - start;
      const shares = answers.map((body, p) => this.answerShare(p, body, requestId, model));
      let result;
      try {
        if (answers[0].sharing !== answers[1].sharing) throw new ProtocolError("the replicas use different sharings");
        result = reconstructLabels(shares[0], shares[1], 1, CLASSES, answers[0].sharing);
      } catch (err) {
        throw new ServiceProblem(
          "bad_response",
          "The two replicas' answers do not fit together (they do not open to a single label). Try again; if it keeps happening, the replicas hold mismatched shares.",
          { detail: err.message },
        );
      }
      if (typeof answers[0].serving_version === "string" && answers[0].serving_version !== model.version) {
        this.model = null; // a newer model is served now: ask /v1/model before the next request
      }
      return {
        label: result.labels[0],
        onehot: result.onehots[0],
        latencyMs,
        requestId,
        modelVersion: model.version,
        fracBits: model.fracBits,
        fixed,
        inputShares: [s0, s1],
        answerShares: shares,
        rounds: answers[0].rounds,
        peerBytes: (answers[0].peer_bytes ?? 0) + (answers[1].peer_bytes ?? 0),
      };
    }
    throw new Error("unreachable");
  }

  /** A predict answer's share (BigInt64Array of 10), after checking it answers our request. */
  answerShare(party, body, requestId, model) {
    const url = this.urls[party];
    const bad = (what) =>
      new ServiceProblem("bad_response", `${name(party, url)} answered something unexpected (${what}).`, { party });
    if (body.model_version !== model.version) {
      throw new ServiceProblem(
        "version_mismatch",
        `${name(party, url)} answered with model ${body.model_version}, but the page asked for ${model.version}. The replicas may be switching models; try again.`,
        { party },
      );
    }
    const expected = { request_id: requestId, party, output: "label" };
    for (const [key, value] of Object.entries(expected)) {
      if (body[key] !== value) throw bad(`${key}=${JSON.stringify(body[key])}, expected ${JSON.stringify(value)}`);
    }
    if (!LABEL_SHARINGS.includes(body.sharing)) {
      throw bad(`sharing=${JSON.stringify(body.sharing)}, expected one of ${JSON.stringify(LABEL_SHARINGS)}`);
    }
    let tensor;
    try {
      tensor = decodeTensor(body.share);
    } catch (err) {
      throw bad(err instanceof ProtocolError ? err.message : String(err));
    }
    if (tensor.shape.length !== 2 || tensor.shape[0] !== 1 || tensor.shape[1] !== CLASSES) {
      throw bad(`a share of shape [${tensor.shape}]`);
    }
    return tensor.values;
  }
}

/**
 * Several replica pairs behind one page: requests take turns over the pairs; a request a pair
 * fails because it is down, unready or overloaded goes to the next pair (with a fresh request
 * id: `ReplicaClient.predict` makes one per attempt), so the person sees no error.
 */
export class PairedClient {
  constructor(pairs, options = {}) {
    this.clients = pairs.map((urls) => new ReplicaClient(urls, options));
    this.failedAt = pairs.map(() => null);
    this.turn = 0;
    this.current = this.clients[0];
  }

  /** The URLs of the pair that answered last (the first pair before any answer). */
  get urls() {
    return this.current.urls;
  }

  /** The pairs' indices to try for the next request: each in turn, lately failed ones last. */
  order() {
    const n = this.clients.length;
    const start = this.turn++ % n;
    const now = performance.now();
    const cool = this.failedAt.map((t) => t === null || now - t >= COOLDOWN_MS);
    const turn = [...Array(n).keys()].map((i) => (start + i) % n);
    return [...turn.filter((k) => cool[k]), ...turn.filter((k) => !cool[k])];
  }

  /** `fn(client)` on the pairs in order until one answers or fails for the caller's reason. */
  async attempt(fn) {
    const order = this.order();
    for (const [i, k] of order.entries()) {
      try {
        const result = await fn(this.clients[k]);
        this.failedAt[k] = null;
        this.current = this.clients[k];
        return [k, result];
      } catch (err) {
        if (i === order.length - 1 || !retryable(err)) throw err;
        this.failedAt[k] = performance.now();
        this.clients[k].model = null;
      }
    }
    throw new Error("unreachable");
  }

  /** The model of the first pair that answers. */
  async getModel(refresh = false) {
    return (await this.attempt((c) => c.getModel(refresh)))[1];
  }

  /** `ReplicaClient.predict` on the next pair that answers; the result says which (`pair`). */
  async predict(x) {
    const [k, result] = await this.attempt((c) => c.predict(x));
    return { ...result, pair: k, urls: this.clients[k].urls };
  }

  /** The same call on both replicas of the pair that answered last. */
  async both(path, bodies) {
    return this.current.both(path, bodies);
  }
}
