//! [`StepReport`]: a step's report kept as the engine made it, turned into JSON only when Python
//! reads it. Most steps' reports are never read, and writing and parsing the JSON of a model with
//! dozens of layers costs a sizeable part of a short step (0.25 ms of parsing alone on a 22 ms
//! transformer step).
use crate::errors::InternalError;
use gradguard_guard::Report;
use pyo3::prelude::*;

/// One step's report (`gradguard.Release.report` parses its JSON on first use).
#[pyclass(module = "gradguard._native", frozen)]
pub(crate) struct StepReport(pub(crate) Report);

#[pymethods]
impl StepReport {
    /// The report as JSON.
    fn json(&self) -> PyResult<String> {
        serde_json::to_string(&self.0).map_err(|e| InternalError::new_err(format!("writing the report: {e}")))
    }

    /// Whether the leakage was estimated at this step.
    #[getter]
    fn estimated(&self) -> bool {
        self.0.estimated
    }

    /// Wall time of the step's estimate in seconds, None when none ran.
    #[getter]
    fn estimate_seconds(&self) -> Option<f64> {
        self.0.estimate_seconds
    }

    /// The training step the report is for.
    #[getter]
    fn step(&self) -> u64 {
        self.0.step
    }
}
