//! Parameters between numpy and tch: named host arrays, read from and written to `{name: ndarray}`.
use crate::errors::{FlResult, InternalError, ParameterError};
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{IntoPyArray, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use tch::{Kind, Tensor};

// ---------------------------------------------------------------------------------------------
// Parameters: numpy <-> tch

/// One named parameter on the host.
#[derive(Debug, Clone)]
pub(crate) struct HostArray {
    pub(crate) name: String,
    pub(crate) shape: Vec<i64>,
    pub(crate) data: Vec<f32>,
}

impl HostArray {
    pub(crate) fn to_tensor(&self) -> FlResult<Tensor> {
        Ok(Tensor::f_from_slice(&self.data)?.f_reshape(self.shape.as_slice())?)
    }

    pub(crate) fn from_tensor(name: &str, t: &Tensor) -> FlResult<Self> {
        let shape = t.size();
        let flat = t.f_detach()?.f_to_kind(Kind::Float)?.f_contiguous()?.f_reshape([-1])?;
        Ok(Self { name: name.to_string(), shape, data: Vec::<f32>::try_from(&flat)? })
    }

    pub(crate) fn to_numpy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let shape: Vec<usize> = self.shape.iter().map(|&d| d as usize).collect();
        let array = ArrayD::from_shape_vec(IxDyn(&shape), self.data.clone())
            .map_err(|e| InternalError::new_err(format!("parameter {}: {e}", self.name)))?;
        Ok(array.into_pyarray(py).into_any())
    }
}

/// Reads `{name: ndarray}` (float32 or float64, any layout) into host arrays.
pub(crate) fn read_params(params: &Bound<'_, PyAny>) -> PyResult<Vec<HostArray>> {
    let dict = params
        .cast::<PyDict>()
        .map_err(|_| ParameterError::new_err(format!("parameters must be a dict of name -> numpy array, got {}", type_name(params))))?;
    let mut out = Vec::with_capacity(dict.len());
    for (key, value) in dict.iter() {
        let name: String = key
            .extract()
            .map_err(|_| ParameterError::new_err(format!("parameter names must be strings, got {}", type_name(&key))))?;
        let (shape, data) = if let Ok(a) = value.extract::<PyReadonlyArrayDyn<'_, f32>>() {
            (a.shape().to_vec(), a.as_array().iter().copied().collect::<Vec<f32>>())
        } else if let Ok(a) = value.extract::<PyReadonlyArrayDyn<'_, f64>>() {
            (a.shape().to_vec(), a.as_array().iter().map(|&v| v as f32).collect::<Vec<f32>>())
        } else {
            let dtype = value.getattr("dtype").map(|d| d.to_string()).unwrap_or_else(|_| type_name(&value));
            return Err(ParameterError::new_err(format!("parameter {name}: expected a float32 (or float64) numpy array, got {dtype}")));
        };
        out.push(HostArray { name, shape: shape.iter().map(|&d| d as i64).collect(), data });
    }
    Ok(out)
}

pub(crate) fn type_name(v: &Bound<'_, PyAny>) -> String {
    v.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

pub(crate) fn params_to_dict<'py>(py: Python<'py>, params: &[HostArray]) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for p in params {
        dict.set_item(&p.name, p.to_numpy(py)?)?;
    }
    Ok(dict)
}

