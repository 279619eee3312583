//! The image source `strata serve` boots nodes from: the image store and builder.

use std::sync::Arc;

use crate::config::Config;
use crate::fleet::ImageSource;

/// Opens the store under the data directory, building the built-in image if absent.
pub async fn open(_config: &Config) -> anyhow::Result<Arc<dyn ImageSource>> {
    anyhow::bail!("image store: integration pending")
}
