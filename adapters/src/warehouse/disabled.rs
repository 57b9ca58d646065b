//! `none://`: no warehouse. Writes succeed and are dropped so the pipeline never stalls on an
//! analytics sink nobody configured; queries fail loudly because there is nothing to answer from.

use async_trait::async_trait;
use cohort_messages::ProfileId;

use super::{BronzeRow, DeleteOutcome, GoldProfileRow, Layer, QueryResult, QueryValue, SilverRow, Warehouse};
use crate::StoreError;

/// The warehouse of `none://`.
#[derive(Debug, Clone, Copy, Default)]
pub struct DisabledWarehouse;

#[async_trait]
impl Warehouse for DisabledWarehouse {
    async fn ensure_schema(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn write_bronze(&self, _rows: Vec<BronzeRow>) -> Result<(), StoreError> {
        Ok(())
    }

    async fn write_silver(&self, _rows: Vec<SilverRow>) -> Result<(), StoreError> {
        Ok(())
    }

    async fn write_gold_profiles(&self, _rows: Vec<GoldProfileRow>) -> Result<(), StoreError> {
        Ok(())
    }

    async fn query(&self, _sql: &str, _params: &[(String, QueryValue)]) -> Result<QueryResult, StoreError> {
        Err(StoreError::invalid("the warehouse is disabled (none://): configure sqlite:// or bigquery:// to query it"))
    }

    async fn delete_profile(&self, _profile_id: &ProfileId) -> Result<DeleteOutcome, StoreError> {
        // Nothing was ever stored, so erasure is trivially complete.
        Ok(DeleteOutcome { rows_deleted: 0, retry_later: false, detail: "warehouse disabled: nothing stored".into() })
    }

    async fn raw_payloads(&self, _after: u64, _limit: usize) -> Result<Vec<(u64, String)>, StoreError> {
        Ok(Vec::new())
    }

    async fn delete_raw(&self, _seqs: &[u64]) -> Result<DeleteOutcome, StoreError> {
        Ok(DeleteOutcome { rows_deleted: 0, retry_later: false, detail: "warehouse disabled: nothing stored".into() })
    }

    async fn count_rows(&self, _layer: Layer) -> Result<u64, StoreError> {
        Ok(0)
    }

    fn table(&self, layer: Layer) -> String {
        layer.view_name().to_string()
    }

    fn backend(&self) -> &'static str {
        "none"
    }
}
