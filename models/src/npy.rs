//! .npy arrays read into host memory, with the checks every audit input needs.
use crate::error::{ModelError, Result};
use std::path::{Path, PathBuf};
use tch::Kind;

/// A .npy array read into host memory.
pub(crate) struct NpyArray {
    pub path: PathBuf,
    pub shape: Vec<i64>,
    pub data: NpyData,
}

/// The values, widened: floats to f64 (with the file's kind), integers to i64 (with the
/// file's dtype name).
pub(crate) enum NpyData {
    Float(Vec<f64>, Kind),
    Int(Vec<i64>, &'static str),
}

impl NpyArray {
    /// The file's dtype as numpy names it.
    pub(crate) fn dtype_name(&self) -> String {
        match &self.data {
            NpyData::Float(_, Kind::Float) => "float32".into(),
            NpyData::Float(_, _) => "float64".into(),
            NpyData::Int(_, name) => name.to_string(),
        }
    }

    /// Samples along dimension 0.
    pub(crate) fn samples(&self) -> usize {
        self.shape[0] as usize
    }
}

/// Reads `path` (`what`: `inputs`, `labels` or `attribute`, for the error messages). A plain,
/// C-ordered numeric array with at least one sample, or an error naming the file.
pub(crate) fn read_npy(path: &Path, what: &'static str) -> Result<NpyArray> {
    if !path.is_file() {
        return Err(ModelError::NotFound { what, path: path.to_path_buf() });
    }
    let not_npy = |why: String| ModelError::NotNpy { what, path: path.to_path_buf(), why };
    let bad_dtype = |why: String| ModelError::Dtype { what, path: path.to_path_buf(), why };
    let bytes = std::fs::read(path).map_err(|e| not_npy(e.to_string()))?;
    let npy = npyz::NpyFile::new(&bytes[..]).map_err(|e| not_npy(e.to_string()))?;
    let shape: Vec<i64> = npy.shape().iter().map(|&d| d as i64).collect();
    if npy.order() == npyz::Order::Fortran {
        return Err(bad_dtype("Fortran-ordered array: save it with np.save(path, np.ascontiguousarray(a))".into()));
    }
    let dtype = npy.dtype();
    let npyz::DType::Plain(ts) = &dtype else {
        return Err(bad_dtype(format!("structured dtype {dtype:?}: expected a plain numeric array")));
    };
    let read_err = |e: std::io::Error| not_npy(format!("reading its data: {e}"));
    let size = ts.size_field();
    let data = match (ts.type_char(), size) {
        (npyz::TypeChar::Float, 4) => NpyData::Float(npy.into_vec::<f32>().map_err(read_err)?.into_iter().map(f64::from).collect(), Kind::Float),
        (npyz::TypeChar::Float, 8) => NpyData::Float(npy.into_vec::<f64>().map_err(read_err)?, Kind::Double),
        (npyz::TypeChar::Int, 1) => NpyData::Int(npy.into_vec::<i8>().map_err(read_err)?.into_iter().map(i64::from).collect(), "int8"),
        (npyz::TypeChar::Int, 2) => NpyData::Int(npy.into_vec::<i16>().map_err(read_err)?.into_iter().map(i64::from).collect(), "int16"),
        (npyz::TypeChar::Int, 4) => NpyData::Int(npy.into_vec::<i32>().map_err(read_err)?.into_iter().map(i64::from).collect(), "int32"),
        (npyz::TypeChar::Int, 8) => NpyData::Int(npy.into_vec::<i64>().map_err(read_err)?, "int64"),
        (npyz::TypeChar::Uint, 1) => NpyData::Int(npy.into_vec::<u8>().map_err(read_err)?.into_iter().map(i64::from).collect(), "uint8"),
        (npyz::TypeChar::Uint, 2) => NpyData::Int(npy.into_vec::<u16>().map_err(read_err)?.into_iter().map(i64::from).collect(), "uint16"),
        (npyz::TypeChar::Uint, 4) => NpyData::Int(npy.into_vec::<u32>().map_err(read_err)?.into_iter().map(i64::from).collect(), "uint32"),
        (npyz::TypeChar::Bool, _) => return Err(bad_dtype("dtype bool: expected numbers".into())),
        (c, s) => return Err(bad_dtype(format!("unsupported dtype {c:?} of {s} bytes: expected float32/float64 or integers"))),
    };
    let len = match &data {
        NpyData::Float(v, _) => v.len(),
        NpyData::Int(v, _) => v.len(),
    };
    if shape.is_empty() || shape[0] == 0 || len == 0 {
        return Err(ModelError::Shape { what, path: path.to_path_buf(), why: format!("shape {shape:?}: expected at least one sample along dimension 0") });
    }
    Ok(NpyArray { path: path.to_path_buf(), shape, data })
}
