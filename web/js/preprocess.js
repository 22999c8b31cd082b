// MNIST-style preprocessing, the same as `preprocess()` in clients/privdigit/preprocess.py.
//
// An image becomes a 28x28 array of grey levels in [0, 1], ink bright on black: transparent
// pixels are composited on the colour opposite to the ink, dark-on-light images are inverted,
// the background level is subtracted, the ink's bounding box is scaled so its longer side is
// 20 px (keeping the aspect) and pasted on a 28x28 black canvas with its centre of mass at
// pixel (14, 14), and the maximum is stretched to 1. The arithmetic follows the Python client
// step by step (Pillow's resampling filters, numpy's median and pairwise sums, Python's
// round-half-to-even) so both produce the same input for the same file.
//
// The core works on plain pixel arrays ({width, height, data: RGBA bytes}) and needs no DOM;
// `decodeImage` turns a File/Blob into such pixels with the browser's own image decoder.

export const SIDE = 28; // MNIST canvas
export const BOX = 20; // the digit's bounding box is fitted into 20x20 ...
export const CENTRE = 14.0; // ... and its centre of mass moved to pixel (14, 14)
export const MAX_SOURCE_SIDE = 1024; // larger images are reduced first (the result is 20 px)
export const MIN_CONTRAST = 0.05; // ink at most this far from the background: the image is blank
export const MAX_PIXELS = 120e6; // refuse to decode anything larger (a 108 MP photo fits)

/** An input that is not a usable digit image; `message` is meant for people. */
export class ImageError extends Error {
  constructor(message) {
    super(message);
    this.name = "ImageError";
  }
}

// -- numerics as numpy / Python do them -----------------------------------------------------

/** Python's round(): to the nearest integer, ties to even. */
export function roundHalfEven(x) {
  const f = Math.floor(x);
  const d = x - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/** numpy's pairwise summation of a contiguous float64 array (the order `ndarray.sum` uses). */
export function pairwiseSum(a, start = 0, n = a.length - start) {
  if (n < 8) {
    let res = 0.0;
    for (let i = 0; i < n; i++) res += a[start + i];
    return res;
  }
  if (n <= 128) {
    const r = new Float64Array(8);
    for (let j = 0; j < 8; j++) r[j] = a[start + j];
    let i = 8;
    for (; i < n - (n % 8); i += 8) {
      for (let j = 0; j < 8; j++) r[j] += a[start + i + j];
    }
    let res = (r[0] + r[1] + (r[2] + r[3])) + (r[4] + r[5] + (r[6] + r[7]));
    for (; i < n; i++) res += a[start + i];
    return res;
  }
  let n2 = Math.floor(n / 2);
  n2 -= n2 % 8;
  return pairwiseSum(a, start, n2) + pairwiseSum(a, start + n2, n - n2);
}

/** numpy's median: the middle value, or the mean of the two middle values. */
export function median(values) {
  const s = Float64Array.from(values).sort();
  const n = s.length;
  if (n === 0) return NaN;
  const m = n >> 1;
  return n % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** The pixels of the frame of `width` pixels around an h x w image, as numpy's `_border`. */
function border(g, h, w, width) {
  const out = [];
  const r0 = Math.min(width, h);
  const c0 = Math.min(width, w);
  for (let r = 0; r < r0; r++) for (let c = 0; c < w; c++) out.push(g[r * w + c]);
  for (let r = Math.max(0, h - width); r < h; r++) for (let c = 0; c < w; c++) out.push(g[r * w + c]);
  for (let r = 0; r < h; r++) for (let c = 0; c < c0; c++) out.push(g[r * w + c]);
  for (let r = 0; r < h; r++) for (let c = Math.max(0, w - width); c < w; c++) out.push(g[r * w + c]);
  return out;
}

function borderWidth(h, w) {
  return Math.max(1, Math.floor(Math.min(h, w) / 20));
}

/** Intensity-weighted mean (row, column) of a non-negative h x w image (float64 sums). */
function centreOfMass(g, h, w) {
  const byRow = new Float64Array(g.length);
  const byCol = new Float64Array(g.length);
  for (let r = 0; r < h; r++) {
    for (let c = 0; c < w; c++) {
      byRow[r * w + c] = g[r * w + c] * r;
      byCol[r * w + c] = g[r * w + c] * c;
    }
  }
  const mass = pairwiseSum(g);
  return [pairwiseSum(byRow) / mass, pairwiseSum(byCol) / mass];
}

// -- Pillow's resampling (Resample.c): convolution with a box or triangle filter ------------

const FILTERS = {
  box: { support: 0.5, fn: (x) => (x > -0.5 && x <= 0.5 ? 1.0 : 0.0) },
  bilinear: {
    support: 1.0,
    fn: (x) => {
      const a = x < 0 ? -x : x;
      return a < 1.0 ? 1.0 - a : 0.0;
    },
  },
};

/**
 * Per output pixel: the first input pixel and the normalised weights (Pillow's coefficients)
 * for resampling the input span [in0, in1) (a float32 box, as Pillow passes it) to `outSize`.
 */
function coefficients(inSize, outSize, filterName, in0 = 0, in1 = inSize) {
  const filter = FILTERS[filterName];
  const scale = Math.fround(in1 - in0) / outSize;
  const filterscale = scale < 1.0 ? 1.0 : scale;
  const support = filter.support * filterscale;
  const ss = 1.0 / filterscale;
  const out = [];
  for (let xx = 0; xx < outSize; xx++) {
    const center = in0 + (xx + 0.5) * scale;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    const k = new Float64Array(Math.max(0, xmax));
    let ww = 0.0;
    for (let x = 0; x < xmax; x++) {
      const wgt = filter.fn((x + xmin - center + 0.5) * ss);
      k[x] = wgt;
      ww += wgt;
    }
    if (ww !== 0.0) for (let x = 0; x < xmax; x++) k[x] /= ww;
    out.push({ min: xmin, k });
  }
  return out;
}

const PRECISION_BITS = 32 - 8 - 2;

function fixedCoefficients(coeffs) {
  const one = 2 ** PRECISION_BITS;
  return coeffs.map(({ min, k }) => ({
    min,
    k: Int32Array.from(k, (v) => (v < 0 ? Math.trunc(-0.5 + v * one) : Math.trunc(0.5 + v * one))),
  }));
}

function clip8(ss) {
  const v = Math.floor(ss / 2 ** PRECISION_BITS);
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

/**
 * Pillow's `Image.resize` of one channel: mode "F" (float32, `bits` 32) or "L" (uint8, `bits`
 * 8), from the source span `box` [x0, y0, x1, y1] (float32; the whole image by default).
 * Horizontal pass first, then vertical, each only when needed (as Pillow decides).
 */
export function resample(src, w, h, outW, outH, filterName, bits = 32, box = [0, 0, w, h]) {
  const float = bits === 32;
  const round = float ? Math.fround : clip8;
  const [x0, y0, x1, y1] = box.map(Math.fround);
  let cur = src;
  let cw = w;
  if (outW !== w || x0 !== 0 || x1 !== outW) {
    let cs = coefficients(w, outW, filterName, x0, x1);
    if (!float) cs = fixedCoefficients(cs);
    const out = float ? new Float32Array(outW * h) : new Uint8Array(outW * h);
    for (let y = 0; y < h; y++) {
      const row = y * cw;
      for (let xx = 0; xx < outW; xx++) {
        const { min, k } = cs[xx];
        let ss = float ? 0.0 : 2 ** (PRECISION_BITS - 1);
        for (let x = 0; x < k.length; x++) ss += cur[row + x + min] * k[x];
        out[y * outW + xx] = round(ss);
      }
    }
    cur = out;
    cw = outW;
  }
  if (outH !== h || y0 !== 0 || y1 !== outH) {
    let cs = coefficients(h, outH, filterName, y0, y1);
    if (!float) cs = fixedCoefficients(cs);
    const out = float ? new Float32Array(cw * outH) : new Uint8Array(cw * outH);
    for (let yy = 0; yy < outH; yy++) {
      const { min, k } = cs[yy];
      for (let x = 0; x < cw; x++) {
        let ss = float ? 0.0 : 2 ** (PRECISION_BITS - 1);
        for (let y = 0; y < k.length; y++) ss += cur[(y + min) * cw + x] * k[y];
        out[yy * cw + x] = round(ss);
      }
    }
    cur = out;
  }
  return cur;
}

/**
 * Pillow's `Image.reduce` of one uint8 channel by integer factors (fx, fy): the rounded mean of
 * each block, the last row and column of blocks possibly narrower (ImagingReduce*).
 */
export function reduce8(src, w, h, fx, fy) {
  const ow = Math.ceil(w / fx);
  const oh = Math.ceil(h / fy);
  const out = new Uint8Array(ow * oh);
  for (let y = 0; y < oh; y++) {
    const ya = y * fy;
    const yb = Math.min(h, ya + fy);
    for (let x = 0; x < ow; x++) {
      const xa = x * fx;
      const xb = Math.min(w, xa + fx);
      const n = (xb - xa) * (yb - ya);
      let ss = Math.floor(n / 2);
      for (let yy = ya; yy < yb; yy++) for (let xx = xa; xx < xb; xx++) ss += src[yy * w + xx];
      const multiplier = Math.trunc(Math.fround(4294967296 / (256 * n))); // float, as Pillow
      out[y * ow + x] = Math.floor((ss * multiplier) / 2 ** 24);
    }
  }
  return out;
}

/**
 * Pillow's `thumbnail(..., BOX)` step from (width, height) to (w, h) on one uint8 channel:
 * with its default reducing_gap of 2, a `reduce` by whole factors first when the image is over
 * twice as large, then BOX resampling of what remains.
 */
function thumbnail8(src, width, height, w, h) {
  const fx = Math.trunc(width / w / 2) || 1;
  const fy = Math.trunc(height / h / 2) || 1;
  if (fx === 1 && fy === 1) return resample(src, width, height, w, h, "box", 8);
  const reduced = reduce8(src, width, height, fx, fy);
  const box = [0, 0, width / fx, height / fy];
  return resample(reduced, Math.ceil(width / fx), Math.ceil(height / fy), w, h, "box", 8, box);
}

/** The size Pillow's `thumbnail((1024, 1024))` gives an image, or null when it fits. */
export function thumbnailSize(w, h, side = MAX_SOURCE_SIDE) {
  if (side >= w && side >= h) return null;
  const aspect = w / h;
  const pick = (number, key) => {
    const lo = Math.floor(number);
    const hi = Math.ceil(number);
    return Math.max(key(hi) < key(lo) ? hi : lo, 1);
  };
  if (side / side >= aspect) {
    return [pick(side * aspect, (n) => Math.abs(aspect - n / side)), side];
  }
  return [side, pick(side / aspect, (n) => (n === 0 ? 0 : Math.abs(aspect - side / n)))];
}

// -- pixels to grey levels (Pillow's conversions) --------------------------------------------

/**
 * Grey levels and alpha in [0, 1] (alpha null when opaque) of RGBA pixels, as `_from_pil`:
 * opaque images go through Pillow's integer luma ("L") and an 8-bit BOX thumbnail; images with
 * transparency through a premultiplied RGBA thumbnail and float luma.
 */
export function greyFromPixels({ width, height, data }) {
  const n = width * height;
  if (!n) throw new ImageError("The image is empty (it has no pixels).");
  let opaque = true;
  for (let i = 3; i < data.length; i += 4) {
    if (data[i] !== 255) {
      opaque = false;
      break;
    }
  }
  const thumb = thumbnailSize(width, height);
  const [w, h] = thumb ?? [width, height];
  if (opaque) {
    let lum = new Uint8Array(n);
    for (let i = 0; i < n; i++) {
      const p = 4 * i;
      lum[i] = (data[p] * 19595 + data[p + 1] * 38470 + data[p + 2] * 7471 + 0x8000) >>> 16;
    }
    if (thumb) lum = thumbnail8(lum, width, height, w, h);
    return { g: Float64Array.from(lum, (v) => v / 255.0), alpha: null, width: w, height: h };
  }
  // RGBA: Pillow premultiplies (RGBa), resizes each channel, then divides the alpha out again.
  const channels = [0, 1, 2, 3].map(() => new Uint8Array(n));
  for (let i = 0; i < n; i++) {
    const p = 4 * i;
    const a = data[p + 3];
    for (let c = 0; c < 3; c++) {
      const t = data[p + c] * a + 128;
      channels[c][i] = thumb ? ((t >>> 8) + t) >>> 8 : data[p + c];
    }
    channels[3][i] = a;
  }
  if (thumb) {
    for (let c = 0; c < 4; c++) channels[c] = thumbnail8(channels[c], width, height, w, h);
    const m = w * h;
    for (let i = 0; i < m; i++) {
      const a = channels[3][i];
      if (a !== 0 && a !== 255) {
        for (let c = 0; c < 3; c++) channels[c][i] = Math.min(255, Math.floor((255 * channels[c][i]) / a));
      }
    }
  }
  const m = w * h;
  const g = new Float64Array(m);
  const alpha = new Float64Array(m);
  for (let i = 0; i < m; i++) {
    g[i] = (channels[0][i] / 255) * 0.299 + (channels[1][i] / 255) * 0.587 + (channels[2][i] / 255) * 0.114;
    alpha[i] = channels[3][i] / 255;
  }
  return { g, alpha, width: w, height: h };
}

// -- MNIST's normalisation -------------------------------------------------------------------

/** True for a 28x28 light-on-dark digit that MNIST's normalisation would leave alone. */
function looksMnist(g, h, w) {
  if (h !== SIDE || w !== SIDE || median(border(g, h, w, 2)) > 0.02) return false;
  let r0 = h;
  let r1 = -1;
  let c0 = w;
  let c1 = -1;
  for (let r = 0; r < h; r++) {
    for (let c = 0; c < w; c++) {
      if (g[r * w + c] > 0.02) {
        r0 = Math.min(r0, r);
        r1 = Math.max(r1, r);
        c0 = Math.min(c0, c);
        c1 = Math.max(c1, c);
      }
    }
  }
  if (r1 < 0) return false;
  const longest = Math.max(r1 - r0 + 1, c1 - c0 + 1);
  const [cy, cx] = centreOfMass(g, h, w);
  return longest >= 18 && longest <= 21 && Math.abs(cy - CENTRE) <= 1.0 && Math.abs(cx - CENTRE) <= 1.0;
}

/** Crop a light-on-dark grey image to the digit, fit it into 20x20, centre it by mass. */
function mnistify(g, h, w) {
  const frame = border(g, h, w, borderWidth(h, w));
  const level = median(frame);
  const noise = 1.4826 * median(frame.map((v) => Math.abs(v - level)));
  const ink = new Float64Array(g.length);
  let peak = 0.0;
  for (let i = 0; i < g.length; i++) {
    const v = g[i] - level;
    ink[i] = v > 0 ? v : 0.0;
    if (ink[i] > peak) peak = ink[i];
  }
  if (peak < MIN_CONTRAST || peak <= 6.0 * noise) {
    throw new ImageError("No digit found: the image looks blank.");
  }
  const floor = Math.max(3.0 * noise, 0.02 * peak);
  const strongAt = Math.max(floor, 0.2 * peak); // the bounding box ignores faint halo and specks
  let r0 = h;
  let r1 = -1;
  let c0 = w;
  let c1 = -1;
  for (let r = 0; r < h; r++) {
    for (let c = 0; c < w; c++) {
      const i = r * w + c;
      if (ink[i] < floor) ink[i] = 0.0;
      if (ink[i] >= strongAt) {
        r0 = Math.min(r0, r);
        r1 = Math.max(r1, r);
        c0 = Math.min(c0, c);
        c1 = Math.max(c1, c);
      }
    }
  }
  const ch = r1 - r0 + 1;
  const cw = c1 - c0 + 1;
  let crop = new Float32Array(ch * cw);
  for (let r = 0; r < ch; r++) {
    for (let c = 0; c < cw; c++) crop[r * cw + c] = ink[(r + r0) * w + c + c0];
  }
  const longest = Math.max(ch, cw);
  const sw = Math.max(1, roundHalfEven((cw * BOX) / longest));
  const sh = Math.max(1, roundHalfEven((ch * BOX) / longest));
  if (sw !== cw || sh !== ch) {
    crop = resample(crop, cw, ch, sw, sh, longest > BOX ? "box" : "bilinear", 32);
  }
  const patch = Float64Array.from(crop, (v) => (v > 0 ? v : 0.0));
  const [cy, cx] = centreOfMass(patch, sh, sw);
  const clamp = (v, lo, hi) => Math.min(Math.max(v, lo), hi);
  const top = clamp(Math.floor(CENTRE - cy + 0.5), 0, SIDE - sh);
  const left = clamp(Math.floor(CENTRE - cx + 0.5), 0, SIDE - sw);
  let max = 0.0;
  for (const v of patch) if (v > max) max = v;
  const out = new Float32Array(SIDE * SIDE);
  for (let r = 0; r < sh; r++) {
    for (let c = 0; c < sw; c++) {
      out[(top + r) * SIDE + left + c] = clamp(patch[r * sw + c] / max, 0.0, 1.0);
    }
  }
  return out;
}

/**
 * The 28x28 MNIST-style input (Float32Array of 784 values in [0, 1], ink bright on black) of
 * RGBA pixels {width, height, data}. Throws `ImageError` for a blank image.
 */
export function preprocessPixels(pixels) {
  const grey = greyFromPixels(pixels);
  const { alpha, width: w, height: h } = grey;
  let { g } = grey;
  if (alpha !== null) {
    let amin = Infinity;
    for (const a of alpha) if (a < amin) amin = a;
    if (amin < 0.99) {
      const weight = pairwiseSum(alpha);
      if (weight < 1e-6) throw new ImageError("No digit found: the image is fully transparent.");
      const weighted = Float64Array.from(alpha, (a, i) => a * g[i]);
      const back = pairwiseSum(weighted) / weight >= 0.5 ? 0.0 : 1.0;
      g = Float64Array.from(alpha, (a, i) => a * g[i] + (1.0 - a) * back);
    }
  }
  if (median(border(g, h, w, borderWidth(h, w))) > 0.5) {
    g = g.map((v) => 1.0 - v); // dark ink on a light background
  }
  if (looksMnist(g, h, w)) return Float32Array.from(g);
  return mnistify(g, h, w);
}

// -- the browser's side: decoding files and reading canvases ---------------------------------

/** RGBA pixels of an image file (PNG, JPEG, GIF, WebP, BMP, ...) decoded by the browser. */
export async function decodeImage(blob) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob, {
      colorSpaceConversion: "none",
      premultiplyAlpha: "none",
    });
  } catch {
    const what = blob && blob.name ? `"${blob.name}"` : "That file";
    throw new ImageError(
      `${what} is not an image this browser can read. Pick a PNG, JPEG, GIF or WebP picture of one digit.`,
    );
  }
  try {
    const { width, height } = bitmap;
    if (!width || !height) throw new ImageError("The image is empty (it has no pixels).");
    if (width * height > MAX_PIXELS) {
      throw new ImageError(
        `The image is too large (${width}×${height} pixels); use one under 120 megapixels.`,
      );
    }
    const canvas = new OffscreenCanvas(width, height);
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(bitmap, 0, 0);
    const { data } = ctx.getImageData(0, 0, width, height);
    return { width, height, data, bitmap };
  } catch (err) {
    bitmap.close();
    throw err;
  }
}

/** The 28x28 input of an image file or blob. */
export async function preprocessBlob(blob) {
  const pixels = await decodeImage(blob);
  pixels.bitmap.close();
  return preprocessPixels(pixels);
}
