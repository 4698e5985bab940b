//! Where every tap of a `k x k` depthwise conv reads: the padded, stride-phase-split plane
//! buffers (`Geometry`), the NCHW layout of a contiguous tensor (`Layout`), and the element
//! types the kernels read and write.

/// A float element the kernel reads and writes (computation is in float64).
pub trait Element: Copy + Send + Sync + 'static {
    /// The tensor dtype of this element.
    const KIND: tch::Kind;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

impl Element for f32 {
    const KIND: tch::Kind = tch::Kind::Float;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Element for f64 {
    const KIND: tch::Kind = tch::Kind::Double;
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// The conv geometry of one block on one input size.
///
/// Each `h x w` input plane is padded and split into `stride^2` phase planes of `ph x pw`, so
/// that for a row of outputs every tap reads one contiguous slice of one phase plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub k: usize,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    pub h: usize,
    pub w: usize,
    pub oh: usize,
    pub ow: usize,
    pub(crate) ph: usize,
    pub(crate) pw: usize,
}

impl Geometry {
    /// The geometry of a `k x k` conv on `h x w`; `None` when the output would be empty.
    pub fn new(
        k: usize,
        stride: usize,
        padding: usize,
        dilation: usize,
        h: usize,
        w: usize,
    ) -> Option<Self> {
        let span = dilation * (k - 1) + 1;
        if k == 0 || stride == 0 || h + 2 * padding < span || w + 2 * padding < span {
            return None;
        }
        let oh = (h + 2 * padding - span) / stride + 1;
        let ow = (w + 2 * padding - span) / stride + 1;
        let reach = dilation * (k - 1) / stride;
        Some(Geometry {
            k,
            stride,
            padding,
            dilation,
            h,
            w,
            oh,
            ow,
            ph: oh + reach,
            pw: ow + reach,
        })
    }

    pub fn taps(&self) -> usize {
        self.k * self.k
    }

    /// The centre tap's index (the tap the scale and skip branches read).
    pub fn centre(&self) -> usize {
        (self.k / 2) * self.k + self.k / 2
    }

    pub(crate) fn phase_len(&self) -> usize {
        self.ph * self.pw
    }

    pub(crate) fn buffer_len(&self) -> usize {
        self.stride * self.stride * self.phase_len()
    }

    /// Where tap `t` of output `(0, 0)` lies in the phase buffer; output `(oy, ox)` adds
    /// `oy * pw + ox`.
    pub(crate) fn tap_offset(&self, t: usize) -> usize {
        let (dy, dx) = ((t / self.k) * self.dilation, (t % self.k) * self.dilation);
        let phase = (dy % self.stride) * self.stride + dx % self.stride;
        phase * self.phase_len() + (dy / self.stride) * self.pw + dx / self.stride
    }

    pub(crate) fn tap_offsets(&self) -> Vec<usize> {
        (0..self.taps()).map(|t| self.tap_offset(t)).collect()
    }

    /// Phase-buffer columns `j` of phase `r` that hold input columns: `lo..hi`, with input
    /// column `j * stride + r - padding`.
    fn valid_columns(&self, r: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.padding);
        // smallest j with j*s + r >= p, and the first j with j*s + r - p >= w
        let lo = (p.saturating_sub(r)).div_ceil(s);
        let hi = (self.w + p).saturating_sub(r).div_ceil(s);
        (lo.min(self.pw), hi.clamp(lo.min(self.pw), self.pw))
    }

    /// The strided fill (stride >= 2): each input row is padded once into `row` (length
    /// `pw * stride`, `pad` outside the input, `value(x)` inside), then split into the phase rows.
    #[inline(always)]
    fn fill_strided<T: Copy, B: Copy>(
        &self,
        x: &[T],
        pad: B,
        value: impl Fn(T) -> B,
        row: &mut [B],
        buf: &mut [B],
    ) {
        let (s, p, w, pw) = (self.stride, self.padding, self.w, self.pw);
        let (lo, hi) = (p.min(pw * s), (p + w).min(pw * s));
        for ry in 0..s {
            for i in 0..self.ph {
                let y = (i * s + ry).wrapping_sub(p);
                let phase_row = |rx: usize| ((ry * s + rx) * self.ph + i) * pw;
                if y >= self.h {
                    for rx in 0..s {
                        buf[phase_row(rx)..][..pw].fill(pad);
                    }
                    continue;
                }
                row[..lo].fill(pad);
                row[hi..].fill(pad);
                for (d, v) in row[lo..hi].iter_mut().zip(&x[y * w..][..hi - lo]) {
                    *d = value(*v);
                }
                if s == 2 {
                    let (even, rest) = buf[phase_row(0)..].split_at_mut(pw);
                    let odd = &mut rest[phase_row(1) - phase_row(0) - pw..][..pw];
                    for ((e, o), pair) in
                        even.iter_mut().zip(odd.iter_mut()).zip(row.chunks_exact(2))
                    {
                        *e = pair[0];
                        *o = pair[1];
                    }
                } else {
                    for rx in 0..s {
                        let dst = &mut buf[phase_row(rx)..][..pw];
                        for (d, v) in dst.iter_mut().zip(row[rx..].iter().step_by(s)) {
                            *d = *v;
                        }
                    }
                }
            }
        }
    }

    /// Fills `buf` with the padded plane `x`: `pad` outside the input, `value(x)` inside.
    #[inline(always)]
    fn fill_with<T: Copy, B: Copy>(&self, x: &[T], pad: B, value: impl Fn(T) -> B, buf: &mut [B]) {
        if self.stride > 1 {
            let mut row = vec![pad; self.pw * self.stride];
            self.fill_strided(x, pad, value, &mut row, buf);
            return;
        }
        let (lo, hi) = self.valid_columns(0);
        for (i, row) in buf[..self.phase_len()]
            .chunks_exact_mut(self.pw)
            .enumerate()
        {
            let y = i.wrapping_sub(self.padding);
            if y >= self.h {
                row.fill(pad);
                continue;
            }
            row[..lo].fill(pad);
            row[hi..].fill(pad);
            if lo < hi {
                let src = &x[y * self.w + lo - self.padding..][..hi - lo];
                for (v, x) in row[lo..hi].iter_mut().zip(src) {
                    *v = value(*x);
                }
            }
        }
    }

    /// Fills `buf` with the padded plane `x` minus `shift` (so padding reads `-shift`).
    #[inline(always)]
    pub(crate) fn fill<T: Element>(&self, x: &[T], shift: f64, buf: &mut [f64]) {
        self.fill_with(x, -shift, |v: T| v.to_f64() - shift, buf);
    }

    /// Fills `buf` with the padded float32 plane `x` (zeros in the padding), for inference.
    #[inline(always)]
    pub(crate) fn fill_f32(&self, x: &[f32], buf: &mut [f32]) {
        self.fill_with(x, 0.0, |v: f32| v, buf);
    }

    /// Writes the raw plane `dx` from the padded-frame gradient `buf` (the padding is dropped;
    /// positions no tap reaches get zero).
    #[inline(always)]
    pub(crate) fn gather<T: Element>(&self, buf: &[f64], dx: &mut [T]) {
        let (s, p) = (self.stride, self.padding);
        for ry in 0..s {
            for rx in 0..s {
                let (lo, hi) = self.valid_columns(rx);
                let phase = &buf[(ry * s + rx) * self.phase_len()..][..self.phase_len()];
                for (i, row) in phase.chunks_exact(self.pw).enumerate() {
                    let y = (i * s + ry).wrapping_sub(p);
                    if y >= self.h || lo >= hi {
                        continue;
                    }
                    let first = lo * s + rx - p;
                    let dst = &mut dx[y * self.w + first..][..(hi - lo - 1) * s + 1];
                    if s == 1 {
                        for (d, v) in dst.iter_mut().zip(&row[lo..hi]) {
                            *d = T::from_f64(*v);
                        }
                    } else {
                        for (d, v) in dst.iter_mut().step_by(s).zip(&row[lo..hi]) {
                            *d = T::from_f64(*v);
                        }
                    }
                }
            }
        }
        // Input rows and columns past every phase plane's reach get no gradient.
        let (rows, cols) = (self.ph * s, self.pw * s);
        for (y, row) in dx.chunks_exact_mut(self.w).enumerate() {
            if y + p >= rows {
                row.fill(T::from_f64(0.0));
            } else if self.w + p > cols {
                row[cols.saturating_sub(p)..].fill(T::from_f64(0.0));
            }
        }
    }
}
/// The shape of a contiguous NCHW tensor and its geometry.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub n: usize,
    pub c: usize,
    pub geo: Geometry,
}

impl Layout {
    pub(crate) fn plane(&self) -> usize {
        self.geo.h * self.geo.w
    }

    pub(crate) fn out_plane(&self) -> usize {
        self.geo.oh * self.geo.ow
    }

    pub(crate) fn count(&self) -> usize {
        self.n * self.out_plane()
    }

    /// Input plane `(n, c)`.
    pub(crate) fn input<'a, T>(&self, x: &'a [T], n: usize, c: usize) -> &'a [T] {
        &x[(n * self.c + c) * self.plane()..][..self.plane()]
    }

    /// Input plane `(n, c)` as the per-plane kernels read it, with the tap `offsets` of this
    /// layout's geometry and the `shift` subtracted while filling.
    pub(crate) fn input_plane<'a, T>(
        &'a self,
        offsets: &'a [usize],
        x: &'a [T],
        (n, c): (usize, usize),
        shift: f64,
    ) -> Plane<'a, T> {
        Plane {
            geo: &self.geo,
            offsets,
            x: self.input(x, n, c),
            shift,
        }
    }

    /// Output plane `(n, c)`.
    pub(crate) fn output<'a, T>(&self, g: &'a [T], n: usize, c: usize) -> &'a [T] {
        &g[(n * self.c + c) * self.out_plane()..][..self.out_plane()]
    }
}

/// The tap rows of output row `oy`: one slice of `buf` per tap.
#[inline(always)]
pub(crate) fn tap_rows<'a>(
    geo: &Geometry,
    offsets: &[usize],
    buf: &'a [f64],
    oy: usize,
    rows: &mut Vec<&'a [f64]>,
) {
    rows.clear();
    rows.extend(offsets.iter().map(|&o| &buf[o + oy * geo.pw..][..geo.ow]));
}

/// One input plane as the per-plane kernels read it: the geometry, the tap offsets into the
/// filled buffer, the plane's values, and the shift subtracted while filling (0 where none is).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plane<'a, T> {
    pub geo: &'a Geometry,
    pub offsets: &'a [usize],
    pub x: &'a [T],
    pub shift: f64,
}
