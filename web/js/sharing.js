// Fixed point, additive secret sharing over Z_2^64 and the wire encoding of tensors, as in
// clients/privdigit/sharing.py and wire.py (`encode_fixed`, `share_image`, `encode_tensor`,
// `decode_tensor`, `reconstruct_label`). 64-bit ring arithmetic uses BigInt and BigInt64Array/BigUint64Array;
// randomness comes from the browser's CSPRNG (`crypto.getRandomValues`).
//
// Wire format of a tensor (both directions):
//   {"dtype": "int64", "shape": [...], "data": base64(little-endian int64 values, C order)}

const MASK64 = (1n << 64n) - 1n;
/** The "zero" label sharing's modulus (the service's `ring.PRIME`). */
export const LABEL_PRIME = 65521n;
export const LABEL_SHARINGS = ["zero", "xor"];

/** A reply or value that does not follow the protocol; `message` is technical. */
export class ProtocolError extends Error {
  constructor(message) {
    super(message);
    this.name = "ProtocolError";
  }
}

/** Python's / numpy's round(): to the nearest integer, ties to even. */
function roundHalfEven(x) {
  const f = Math.floor(x);
  const d = x - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/** round(x * 2^fracBits) of each real value, as ring elements (BigInt64Array). */
export function encodeFixed(values, fracBits) {
  if (!Number.isInteger(fracBits) || fracBits < 0 || fracBits > 52) {
    throw new RangeError(`frac_bits must be an integer in 0..52, got ${fracBits}`);
  }
  const scale = 2 ** fracBits;
  const out = new BigInt64Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const v = Number(values[i]);
    if (!Number.isFinite(v)) throw new RangeError("cannot encode NaN or infinite values");
    const s = roundHalfEven(v * scale);
    if (Math.abs(s) >= 2 ** 62) throw new RangeError("value too large for fixed point");
    out[i] = BigInt(s);
  }
  return out;
}

/** n uniform 64-bit words from the browser's CSPRNG (at most 64 KiB per call, as it allows). */
export function randomU64(n) {
  const out = new BigUint64Array(n);
  const perCall = 65536 / 8;
  for (let i = 0; i < n; i += perCall) {
    crypto.getRandomValues(out.subarray(i, Math.min(n, i + perCall)));
  }
  return out;
}

/**
 * Two additive shares of ring elements `x` (BigInt64Array): s0 uniform, s1 = x - s0 mod 2^64.
 * `s0` may be given (tests); both come back as BigInt64Array.
 */
export function share(x, s0 = null) {
  const r = s0 === null ? randomU64(x.length) : BigUint64Array.from(s0, (v) => BigInt.asUintN(64, BigInt(v)));
  if (r.length !== x.length) throw new RangeError("the share and the secret differ in length");
  const s1 = new BigUint64Array(x.length);
  for (let i = 0; i < x.length; i++) s1[i] = (BigInt.asUintN(64, x[i]) - r[i]) & MASK64;
  return [new BigInt64Array(r.buffer), new BigInt64Array(s1.buffer)];
}

/** (a + b) mod 2^64 elementwise, read as signed: what two additive shares open to. */
export function addShares(a, b) {
  return BigInt64Array.from(a, (v, i) => BigInt.asIntN(64, v + b[i]));
}

/** BigInt64Array of decimal strings or numbers (any integers; taken mod 2^64, read signed). */
export function int64From(values) {
  return BigInt64Array.from(values, (v) => BigInt.asIntN(64, BigInt(v)));
}

// -- base64 of little-endian int64 ------------------------------------------------------------

function bytesToBase64(bytes) {
  let binary = "";
  const chunk = 0x8000;
  for (let i = 0; i < bytes.length; i += chunk) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + chunk));
  }
  return btoa(binary);
}

const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

function base64ToBytes(text) {
  if (!BASE64.test(text)) throw new ProtocolError("tensor data is not valid standard base64");
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

/** The JSON form of int64 ring elements with the given shape (key order as the Python client). */
export function encodeTensor(values, shape) {
  const count = shape.reduce((a, b) => a * b, 1);
  if (count !== values.length) {
    throw new RangeError(`shape [${shape}] needs ${count} values, got ${values.length}`);
  }
  const buf = new ArrayBuffer(8 * values.length);
  const view = new DataView(buf);
  for (let i = 0; i < values.length; i++) view.setBigInt64(8 * i, BigInt.asIntN(64, BigInt(values[i])), true);
  return { dtype: "int64", shape: shape.map(Number), data: bytesToBase64(new Uint8Array(buf)) };
}

/** {shape, values: BigInt64Array} of a JSON tensor; `ProtocolError` unless exactly well-formed. */
export function decodeTensor(obj) {
  if (obj === null || typeof obj !== "object" || Array.isArray(obj)) {
    throw new ProtocolError("a tensor must be a JSON object");
  }
  const { dtype, shape, data } = obj;
  if (dtype !== "int64") throw new ProtocolError(`tensor dtype must be 'int64', got ${JSON.stringify(dtype)}`);
  if (!Array.isArray(shape) || !shape.every((d) => Number.isInteger(d) && d >= 0)) {
    throw new ProtocolError("tensor shape must be a list of non-negative integers");
  }
  if (typeof data !== "string") throw new ProtocolError("tensor data must be a base64 string");
  const bytes = base64ToBytes(data);
  const count = shape.reduce((a, b) => a * b, 1);
  if (bytes.length !== 8 * count) {
    throw new ProtocolError(`tensor data holds ${bytes.length} bytes; shape [${shape}] needs ${8 * count}`);
  }
  const view = new DataView(bytes.buffer);
  const values = new BigInt64Array(count);
  for (let i = 0; i < count; i++) values[i] = view.getBigInt64(8 * i, true);
  return { shape, values };
}

/**
 * The label of each of `rows` rows, as `reconstruct_label` in clients/privdigit/sharing.py. Sharing
 * "zero": (s0 + s1) mod LABEL_PRIME is 0 at exactly one place, the label (elsewhere uniform on
 * 1..p-1, meaningless); "xor": s0 XOR s1 is one-hot. Anything else: the replicas' answers do
 * not belong together. `onehots` marks the label's place per row.
 */
export function reconstructLabels(s0, s1, rows, classes, sharing = "zero") {
  if (s0.length !== rows * classes || s1.length !== rows * classes) {
    throw new ProtocolError("the answer shares have the wrong size");
  }
  if (!LABEL_SHARINGS.includes(sharing)) throw new ProtocolError(`unknown label sharing ${sharing}`);
  const inField = (v) => v >= 0n && v < LABEL_PRIME;
  const labels = [];
  const onehots = [];
  for (let r = 0; r < rows; r++) {
    const onehot = [];
    let label = -1;
    let ones = 0;
    let binary = true;
    for (let c = 0; c < classes; c++) {
      const a = s0[r * classes + c];
      const b = s1[r * classes + c];
      if (sharing === "zero" && !(inField(a) && inField(b))) {
        throw new ProtocolError(`label shares must lie in [0, ${LABEL_PRIME})`);
      }
      const v = sharing === "zero" ? BigInt(((a + b) % LABEL_PRIME) === 0n) : a ^ b;
      if (v === 1n) {
        ones += 1;
        label = c;
      } else if (v !== 0n) {
        binary = false;
      }
      onehot.push(Number(v === 1n));
    }
    if (!binary || ones !== 1) {
      throw new ProtocolError(
        `row ${r} of the reconstructed output names no single label: the replicas' shares do not belong together`,
      );
    }
    labels.push(label);
    onehots.push(onehot);
  }
  return { labels, onehots };
}

/** A fresh request id: 24 characters of base64url from 18 CSPRNG bytes (like token_urlsafe(18)). */
export function newRequestId() {
  const bytes = crypto.getRandomValues(new Uint8Array(18));
  return bytesToBase64(bytes).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
}
