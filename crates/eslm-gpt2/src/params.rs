//! The parameter layout (llm.c's): all parameters in ONE contiguous `Vec<f32>`, weights stored `[out, in]` so a
//! linear layer is `y = x·Wᵀ + b`, in this order (per-layer tensors stacked over `L`):
//!
//! `wte [Vp, C]`, `wpe [maxT, C]`, `ln1w [L, C]`, `ln1b [L, C]`, `qkvw [L, 3C, C]`, `qkvb [L, 3C]`,
//! `attprojw [L, C, C]`, `attprojb [L, C]`, `ln2w [L, C]`, `ln2b [L, C]`, `fcw [L, 4C, C]`, `fcb [L, 4C]`,
//! `fcprojw [L, C, 4C]`, `fcprojb [L, C]`, `lnfw [C]`, `lnfb [C]`.
//!
//! Gradients and the AdamW moments use the same layout ([`ParamSet`] for all four). Rows `V..Vp` of `wte` are zero.
//!
//! A [`ParamSet<B>`] lives in a backend's buffer; the default `ParamSet` (= `ParamSet<Cpu>`) is the host vector
//! that checkpoints read and write. The model names each tensor once per layer, llm.c style (`l_ln1w`,
//! `dl_qkvw`): [`ModelWeights`] / [`LayerWeights`] are views cut from the flat buffer by [`ModelWeights::cut`].

use crate::backend::{Backend, Cpu};
use crate::config::GptConfig;

/// The 16 parameter tensors, in storage order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamKind {
    /// Token embedding (tied LM head) `[Vp, C]`.
    Wte,
    /// Position embedding `[maxT, C]`.
    Wpe,
    /// First layer norm weight `[L, C]`.
    Ln1W,
    /// First layer norm bias `[L, C]`.
    Ln1B,
    /// Fused query/key/value weight `[L, 3C, C]`.
    QkvW,
    /// Fused query/key/value bias `[L, 3C]`.
    QkvB,
    /// Attention output projection weight `[L, C, C]`.
    AttProjW,
    /// Attention output projection bias `[L, C]`.
    AttProjB,
    /// Second layer norm weight `[L, C]`.
    Ln2W,
    /// Second layer norm bias `[L, C]`.
    Ln2B,
    /// MLP up-projection weight `[L, 4C, C]`.
    FcW,
    /// MLP up-projection bias `[L, 4C]`.
    FcB,
    /// MLP down-projection weight `[L, C, 4C]`.
    FcProjW,
    /// MLP down-projection bias `[L, C]`.
    FcProjB,
    /// Final layer norm weight `[C]`.
    LnfW,
    /// Final layer norm bias `[C]`.
    LnfB,
}

impl ParamKind {
    /// All kinds in storage order.
    pub const ALL: [ParamKind; 16] = [
        ParamKind::Wte,
        ParamKind::Wpe,
        ParamKind::Ln1W,
        ParamKind::Ln1B,
        ParamKind::QkvW,
        ParamKind::QkvB,
        ParamKind::AttProjW,
        ParamKind::AttProjB,
        ParamKind::Ln2W,
        ParamKind::Ln2B,
        ParamKind::FcW,
        ParamKind::FcB,
        ParamKind::FcProjW,
        ParamKind::FcProjB,
        ParamKind::LnfW,
        ParamKind::LnfB,
    ];

    /// llm.c-style name: `wte`, `wpe`, `ln1w`, `ln1b`, `qkvw`, `qkvb`, `attprojw`, `attprojb`, `ln2w`, `ln2b`,
    /// `fcw`, `fcb`, `fcprojw`, `fcprojb`, `lnfw`, `lnfb`.
    pub fn name(self) -> &'static str {
        match self {
            ParamKind::Wte => "wte",
            ParamKind::Wpe => "wpe",
            ParamKind::Ln1W => "ln1w",
            ParamKind::Ln1B => "ln1b",
            ParamKind::QkvW => "qkvw",
            ParamKind::QkvB => "qkvb",
            ParamKind::AttProjW => "attprojw",
            ParamKind::AttProjB => "attprojb",
            ParamKind::Ln2W => "ln2w",
            ParamKind::Ln2B => "ln2b",
            ParamKind::FcW => "fcw",
            ParamKind::FcB => "fcb",
            ParamKind::FcProjW => "fcprojw",
            ParamKind::FcProjB => "fcprojb",
            ParamKind::LnfW => "lnfw",
            ParamKind::LnfB => "lnfb",
        }
    }

    /// The kind with llm.c-style name `name`, if any.
    pub fn from_name(name: &str) -> Option<ParamKind> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Index in storage order (0..16).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Full shape of this tensor for `cfg` (per-layer tensors carry a leading `L`).
    pub fn shape(self, cfg: &GptConfig) -> Vec<usize> {
        let (l, c, vp, t) = (
            cfg.n_layer,
            cfg.n_embd,
            cfg.padded_vocab_size,
            cfg.max_seq_len,
        );
        match self {
            ParamKind::Wte => vec![vp, c],
            ParamKind::Wpe => vec![t, c],
            ParamKind::Ln1W | ParamKind::Ln1B | ParamKind::Ln2W | ParamKind::Ln2B => vec![l, c],
            ParamKind::AttProjB | ParamKind::FcProjB => vec![l, c],
            ParamKind::QkvW => vec![l, 3 * c, c],
            ParamKind::QkvB => vec![l, 3 * c],
            ParamKind::AttProjW => vec![l, c, c],
            ParamKind::FcW => vec![l, 4 * c, c],
            ParamKind::FcB => vec![l, 4 * c],
            ParamKind::FcProjW => vec![l, c, 4 * c],
            ParamKind::LnfW | ParamKind::LnfB => vec![c],
        }
    }

    /// Whether AdamW applies weight decay to this tensor: matrices (≥ 2-D per layer: embeddings and linear
    /// weights) yes; biases and layer-norm parameters no.
    pub fn decays(self) -> bool {
        matches!(
            self,
            ParamKind::Wte
                | ParamKind::Wpe
                | ParamKind::QkvW
                | ParamKind::AttProjW
                | ParamKind::FcW
                | ParamKind::FcProjW
        )
    }

    /// Whether the tensor is stacked over layers (leading dimension `L`).
    pub fn per_layer(self) -> bool {
        !matches!(
            self,
            ParamKind::Wte | ParamKind::Wpe | ParamKind::LnfW | ParamKind::LnfB
        )
    }
}

/// Offsets and sizes of the 16 tensors inside the flat vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamLayout {
    config: GptConfig,
    offsets: [usize; 16],
    sizes: [usize; 16],
}

impl ParamLayout {
    /// The layout for `cfg` (does not validate `cfg`).
    pub fn new(cfg: &GptConfig) -> Self {
        let mut offsets = [0; 16];
        let mut sizes = [0; 16];
        let mut off = 0;
        for (i, k) in ParamKind::ALL.into_iter().enumerate() {
            let n: usize = k.shape(cfg).iter().product();
            offsets[i] = off;
            sizes[i] = n;
            off += n;
        }
        Self {
            config: *cfg,
            offsets,
            sizes,
        }
    }

    /// The config this layout was built for.
    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    /// Total number of floats.
    pub fn total(&self) -> usize {
        self.offsets[15] + self.sizes[15]
    }

    /// Element range of tensor `k` in the flat vector.
    pub fn range(&self, k: ParamKind) -> std::ops::Range<usize> {
        let i = k.index();
        self.offsets[i]..self.offsets[i] + self.sizes[i]
    }

    /// Shape of tensor `k`.
    pub fn shape(&self, k: ParamKind) -> Vec<usize> {
        k.shape(&self.config)
    }
}

/// One float vector in the parameter layout: the parameters, their gradients, or an AdamW moment, in a buffer
/// of backend `B` (the host by default).
pub struct ParamSet<B: Backend = Cpu> {
    layout: ParamLayout,
    data: B::Buf,
}

impl<B: Backend> Clone for ParamSet<B> {
    fn clone(&self) -> Self {
        Self {
            layout: self.layout.clone(),
            data: self.data.clone(),
        }
    }
}

impl<B: Backend> std::fmt::Debug for ParamSet<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParamSet")
            .field("layout", &self.layout)
            .field("data", &self.data)
            .finish()
    }
}

impl PartialEq for ParamSet {
    fn eq(&self, other: &Self) -> bool {
        self.layout == other.layout && self.data == other.data
    }
}

impl<B: Backend> ParamSet<B> {
    /// A zero-filled set for `cfg` in a buffer of `backend`.
    pub fn zeros_on(backend: &mut B, cfg: &GptConfig) -> Self {
        let layout = ParamLayout::new(cfg);
        let data = backend.alloc(layout.total());
        Self { layout, data }
    }

    /// The layout.
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// The config.
    pub fn config(&self) -> &GptConfig {
        &self.layout.config
    }

    /// Number of floats.
    pub fn len(&self) -> usize {
        self.layout.total()
    }

    /// Whether the set is empty (never, for a valid config).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The flat buffer.
    pub fn buf(&self) -> &B::Buf {
        &self.data
    }

    /// The flat buffer, mutable.
    pub fn buf_mut(&mut self) -> &mut B::Buf {
        &mut self.data
    }

    /// Tensor `k` as a backend view.
    pub fn view(&self, k: ParamKind) -> B::View<'_> {
        B::slice(B::view(&self.data), self.layout.range(k))
    }

    /// Named views of every tensor, per layer.
    pub fn weights(&self) -> ModelWeights<B::View<'_>> {
        ModelWeights::cut(&self.layout, B::view(&self.data), |v, at| B::split(v, at))
    }

    /// Named mutable views of every tensor, per layer (disjoint).
    pub fn weights_mut(&mut self) -> ModelWeights<B::ViewMut<'_>> {
        ModelWeights::cut(&self.layout, B::view_mut(&mut self.data), |v, at| {
            B::split_mut(v, at)
        })
    }
}

/// One block's tensors, named once (llm.c's `l_ln1w`, `l_qkvw`, …; `dl_…` for gradients): views of layer `l` of
/// each stacked tensor.
#[derive(Debug, Clone, Copy)]
pub struct LayerWeights<V> {
    /// First layer norm weight `[C]`.
    pub ln1w: V,
    /// First layer norm bias `[C]`.
    pub ln1b: V,
    /// Fused query/key/value weight `[3C, C]`.
    pub qkvw: V,
    /// Fused query/key/value bias `[3C]`.
    pub qkvb: V,
    /// Attention output projection weight `[C, C]`.
    pub attprojw: V,
    /// Attention output projection bias `[C]`.
    pub attprojb: V,
    /// Second layer norm weight `[C]`.
    pub ln2w: V,
    /// Second layer norm bias `[C]`.
    pub ln2b: V,
    /// MLP up-projection weight `[4C, C]`.
    pub fcw: V,
    /// MLP up-projection bias `[4C]`.
    pub fcb: V,
    /// MLP down-projection weight `[C, 4C]`.
    pub fcprojw: V,
    /// MLP down-projection bias `[C]`.
    pub fcprojb: V,
}

/// Every tensor of the model as a named view: embeddings, one [`LayerWeights`] per block, final layer norm.
#[derive(Debug, Clone)]
pub struct ModelWeights<V> {
    /// Token embedding (tied LM head) `[Vp, C]`.
    pub wte: V,
    /// Position embedding `[maxT, C]`.
    pub wpe: V,
    /// The blocks, in order.
    pub layers: Vec<LayerWeights<V>>,
    /// Final layer norm weight `[C]`.
    pub lnfw: V,
    /// Final layer norm bias `[C]`.
    pub lnfb: V,
}

impl<V> ModelWeights<V> {
    /// Cuts the flat buffer `flat` (in `layout`) into named views with `split(view, at)`, which splits a view
    /// into `[0, at)` and the rest (a backend's `split` or `split_mut`).
    pub fn cut(layout: &ParamLayout, flat: V, split: impl Fn(V, usize) -> (V, V)) -> Self {
        let nl = layout.config.n_layer;
        let mut rest = Some(flat);
        let mut take = |len: usize| {
            let (head, tail) = split(rest.take().expect("the layout covers the buffer"), len);
            rest = Some(tail);
            head
        };
        let mut per_kind: Vec<std::vec::IntoIter<V>> = Vec::with_capacity(12);
        let (mut wte, mut wpe, mut lnfw, mut lnfb) = (None, None, None, None);
        for k in ParamKind::ALL {
            let len = layout.range(k).len();
            match k {
                ParamKind::Wte => wte = Some(take(len)),
                ParamKind::Wpe => wpe = Some(take(len)),
                ParamKind::LnfW => lnfw = Some(take(len)),
                ParamKind::LnfB => lnfb = Some(take(len)),
                _ => {
                    let per = len / nl;
                    let views: Vec<V> = (0..nl).map(|_| take(per)).collect();
                    per_kind.push(views.into_iter());
                }
            }
        }
        let mut next = |i: usize| per_kind[i].next().expect("one view per layer");
        let layers = (0..nl)
            .map(|_| LayerWeights {
                ln1w: next(0),
                ln1b: next(1),
                qkvw: next(2),
                qkvb: next(3),
                attprojw: next(4),
                attprojb: next(5),
                ln2w: next(6),
                ln2b: next(7),
                fcw: next(8),
                fcb: next(9),
                fcprojw: next(10),
                fcprojb: next(11),
            })
            .collect();
        let get = |x: Option<V>| x.expect("every global tensor is in the layout");
        Self {
            wte: get(wte),
            wpe: get(wpe),
            layers,
            lnfw: get(lnfw),
            lnfb: get(lnfb),
        }
    }
}

/// Immutable per-kind views of a [`ParamSet`] (full tensors; index layer `l` with [`layer`]).
#[derive(Debug, Clone, Copy)]
#[allow(missing_docs)]
pub struct ParamViews<'a> {
    pub wte: &'a [f32],
    pub wpe: &'a [f32],
    pub ln1w: &'a [f32],
    pub ln1b: &'a [f32],
    pub qkvw: &'a [f32],
    pub qkvb: &'a [f32],
    pub attprojw: &'a [f32],
    pub attprojb: &'a [f32],
    pub ln2w: &'a [f32],
    pub ln2b: &'a [f32],
    pub fcw: &'a [f32],
    pub fcb: &'a [f32],
    pub fcprojw: &'a [f32],
    pub fcprojb: &'a [f32],
    pub lnfw: &'a [f32],
    pub lnfb: &'a [f32],
}

/// Mutable per-kind views of a [`ParamSet`] (disjoint, so several can be written at once).
#[derive(Debug)]
#[allow(missing_docs)]
pub struct ParamViewsMut<'a> {
    pub wte: &'a mut [f32],
    pub wpe: &'a mut [f32],
    pub ln1w: &'a mut [f32],
    pub ln1b: &'a mut [f32],
    pub qkvw: &'a mut [f32],
    pub qkvb: &'a mut [f32],
    pub attprojw: &'a mut [f32],
    pub attprojb: &'a mut [f32],
    pub ln2w: &'a mut [f32],
    pub ln2b: &'a mut [f32],
    pub fcw: &'a mut [f32],
    pub fcb: &'a mut [f32],
    pub fcprojw: &'a mut [f32],
    pub fcprojb: &'a mut [f32],
    pub lnfw: &'a mut [f32],
    pub lnfb: &'a mut [f32],
}

/// Layer `l` of a stacked tensor `t` with `L` layers (`t.len() / L` floats each).
#[inline]
pub fn layer<T>(t: &[T], n_layer: usize, l: usize) -> &[T] {
    let n = t.len() / n_layer;
    &t[l * n..(l + 1) * n]
}

/// Mutable layer `l` of a stacked tensor.
#[inline]
pub fn layer_mut<T>(t: &mut [T], n_layer: usize, l: usize) -> &mut [T] {
    let n = t.len() / n_layer;
    &mut t[l * n..(l + 1) * n]
}

impl ParamSet {
    /// A zero-filled host set for `cfg`.
    pub fn zeros(cfg: &GptConfig) -> Self {
        Self::zeros_on(&mut Cpu::new(), cfg)
    }

    /// The flat vector.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// The flat vector, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Sets every element to zero.
    pub fn fill_zero(&mut self) {
        self.data.iter_mut().for_each(|x| *x = 0.0);
    }

    /// Tensor `k` as a flat slice.
    pub fn get(&self, k: ParamKind) -> &[f32] {
        &self.data[self.layout.range(k)]
    }

    /// Tensor `k` as a flat mutable slice.
    pub fn get_mut(&mut self, k: ParamKind) -> &mut [f32] {
        let r = self.layout.range(k);
        &mut self.data[r]
    }

    /// `(name, shape, data)` of every tensor in storage order.
    pub fn tensors(&self) -> impl Iterator<Item = (&'static str, Vec<usize>, &[f32])> + '_ {
        ParamKind::ALL
            .into_iter()
            .map(move |k| (k.name(), self.layout.shape(k), self.get(k)))
    }

    /// `(name, shape, data)` of every tensor in storage order, mutable.
    pub fn tensors_mut(
        &mut self,
    ) -> impl Iterator<Item = (&'static str, Vec<usize>, &mut [f32])> + '_ {
        let layout = self.layout.clone();
        let mut rest: &mut [f32] = &mut self.data;
        ParamKind::ALL.into_iter().map(move |k| {
            let n = layout.range(k).len();
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
            rest = tail;
            (k.name(), layout.shape(k), head)
        })
    }

    /// Immutable views of all 16 tensors.
    pub fn views(&self) -> ParamViews<'_> {
        let g = |k| self.get(k);
        ParamViews {
            wte: g(ParamKind::Wte),
            wpe: g(ParamKind::Wpe),
            ln1w: g(ParamKind::Ln1W),
            ln1b: g(ParamKind::Ln1B),
            qkvw: g(ParamKind::QkvW),
            qkvb: g(ParamKind::QkvB),
            attprojw: g(ParamKind::AttProjW),
            attprojb: g(ParamKind::AttProjB),
            ln2w: g(ParamKind::Ln2W),
            ln2b: g(ParamKind::Ln2B),
            fcw: g(ParamKind::FcW),
            fcb: g(ParamKind::FcB),
            fcprojw: g(ParamKind::FcProjW),
            fcprojb: g(ParamKind::FcProjB),
            lnfw: g(ParamKind::LnfW),
            lnfb: g(ParamKind::LnfB),
        }
    }

    /// Disjoint mutable views of all 16 tensors.
    pub fn views_mut(&mut self) -> ParamViewsMut<'_> {
        let mut it = self.tensors_mut().map(|(_, _, d)| d);
        let mut next = || it.next().unwrap_or_default();
        ParamViewsMut {
            wte: next(),
            wpe: next(),
            ln1w: next(),
            ln1b: next(),
            qkvw: next(),
            qkvb: next(),
            attprojw: next(),
            attprojb: next(),
            ln2w: next(),
            ln2b: next(),
            fcw: next(),
            fcb: next(),
            fcprojw: next(),
            fcprojb: next(),
            lnfw: next(),
            lnfb: next(),
        }
    }
}
