//! The synthetic data sets with a planted private attribute, shared by the examples and
//! benches/real_models.rs (each includes this file with `#[path]`).
//!
//! - [`Images`]: 3x32x32 images, each the template of its class (one of 10 fixed random
//!   patterns) plus Gaussian noise of the same scale; attribute 1 brightens channel 0 by 0.5,
//!   which the task does not need (examples/resnet.rs).
//! - [`text`]: sequences of token ids whose label is which of two sets of words (ids 0-4 or
//!   5-9) the sequence draws its sentiment words from; attribute 1 puts the marker (the last
//!   id of the vocabulary) at 30% of the positions, attribute 0 at 3%, independent of the
//!   label (examples/text_classifier.rs).
#![allow(dead_code)]
use tch::{Device, Kind, TchError, Tensor};

/// Classes of [`Images`].
pub const IMAGE_CLASSES: i64 = 10;

/// The image data set: fixed class templates, noise, and the planted attribute.
pub struct Images {
    templates: Tensor,
}

impl Images {
    /// Draws the class templates (from libtorch's global generator: seed it first).
    pub fn new() -> Result<Self, TchError> {
        Ok(Self { templates: Tensor::f_randn([IMAGE_CLASSES, 3, 32, 32], (Kind::Float, Device::Cpu))? })
    }

    /// A batch of `n` (even): images, classes and the attribute (half the batch each,
    /// shuffled).
    pub fn batch(&self, n: i64) -> Result<(Tensor, Tensor, Tensor), TchError> {
        let y = Tensor::f_randint(IMAGE_CLASSES, [n], (Kind::Int64, Device::Cpu))?;
        let a = Tensor::f_arange(n, (Kind::Int64, Device::Cpu))?.f_remainder(2)?.f_index_select(0, &Tensor::f_randperm(n, (Kind::Int64, Device::Cpu))?)?;
        let noise = Tensor::f_randn([n, 3, 32, 32], (Kind::Float, Device::Cpu))?;
        let x = self.templates.f_index_select(0, &y)?.f_add(&noise)?;
        // Attribute 1: channel 0 brightened by 0.5.
        let offset = a.f_to_kind(Kind::Float)?.f_mul_scalar(0.5)?.f_view([n, 1, 1])?;
        let _ = x.f_select(1, 0)?.f_add_(&offset)?;
        Ok((x, y, a))
    }
}

/// `n` synthetic sequences of `length` token ids from a vocabulary of `vocab` (> 10): (token
/// ids [n, length], labels [n] in {0, 1}, attribute [n] in {0, 1}). The marker is `vocab - 1`.
pub fn text(n: i64, vocab: i64, length: i64, seed: i64) -> Result<(Tensor, Tensor, Tensor), TchError> {
    tch::manual_seed(seed);
    let marker = vocab - 1;
    let opts = (Kind::Int64, Device::Cpu);
    let filler = Tensor::f_randint_low(10, marker, [n, length], opts)?;
    let y = Tensor::f_randint(2, [n], opts)?;
    let attribute = Tensor::f_randint(2, [n], opts)?;
    // Sentiment words: ids 0-4 for label 1, 5-9 for label 0, at 20% of the positions.
    let negative = y.f_neg()?.f_add_scalar(1)?.f_mul_scalar(5)?.f_unsqueeze(1)?;
    let sentiment = Tensor::f_randint(5, [n, length], opts)?.f_add(&negative)?;
    let at_sentiment = Tensor::f_rand([n, length], (Kind::Float, Device::Cpu))?.f_lt(0.2)?;
    let tokens = sentiment.f_where_self(&at_sentiment, &filler)?;
    // The marker: 30% of the positions for attribute 1, 3% for attribute 0.
    let marker_rate = attribute.f_to_kind(Kind::Float)?.f_mul_scalar(0.27)?.f_add_scalar(0.03)?.f_unsqueeze(1)?;
    let at_marker = Tensor::f_rand([n, length], (Kind::Float, Device::Cpu))?.f_lt_tensor(&marker_rate)?;
    Ok((tokens.f_masked_fill(&at_marker, marker)?, y, attribute))
}
