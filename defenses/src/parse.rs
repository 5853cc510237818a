//! Reading a defence back from the text its `Display` writes (`clip(max_norm=1)`,
//! `noise(clip_norm=0.5, multiplier=0.1)`, `withhold`): manifests and audit logs carry actions
//! as that text, and a command line names a defence the same way.
use crate::defence::Defence;
use crate::error::DefenceError;
use std::str::FromStr;

impl FromStr for Defence {
    type Err = DefenceError;

    /// Parses `name` or `name(key=value, ...)` with the parameter names of the policy file,
    /// then validates the parameters.
    fn from_str(text: &str) -> Result<Self, DefenceError> {
        let bad = |why: String| DefenceError::Unparsable { text: text.to_string(), why };
        let text = text.trim();
        let (name, args) = match text.split_once('(') {
            None => (text, ""),
            Some((name, rest)) => (name.trim(), rest.strip_suffix(')').ok_or_else(|| bad("missing the closing ')'".into()))?),
        };
        let mut values = std::collections::BTreeMap::new();
        for pair in args.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| bad(format!("'{pair}' is not key=value")))?;
            let value: f64 = value.trim().parse().map_err(|_| bad(format!("'{}' is not a number", value.trim())))?;
            values.insert(key.trim(), value);
        }
        let mut take = |key: &str| values.remove(key).ok_or_else(|| bad(format!("{name} needs {key}=...")));
        let defence = match name {
            "withhold" => Defence::Withhold,
            "clip" => Defence::Clip { max_norm: take("max_norm")? },
            "noise" => Defence::Noise { clip_norm: take("clip_norm")?, multiplier: take("multiplier")? },
            "sparsify" => Defence::Sparsify { keep_fraction: take("keep_fraction")? },
            "quantize" => {
                let bits = take("bits")?;
                if bits.fract() != 0.0 || !(0.0..=u32::MAX as f64).contains(&bits) {
                    return Err(bad(format!("bits={bits} is not a whole number")));
                }
                Defence::Quantize { bits: bits as u32 }
            }
            other => return Err(bad(format!("unknown defence '{other}' (withhold, clip, noise, sparsify, quantize)"))),
        };
        if let Some(key) = values.keys().next() {
            return Err(bad(format!("{name} has no parameter '{key}'")));
        }
        defence.validate()?;
        Ok(defence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_defence_reads_back_what_it_writes() {
        for d in [
            Defence::Withhold,
            Defence::Clip { max_norm: 0.03 },
            Defence::Noise { clip_norm: 0.5, multiplier: 0.1 },
            Defence::Sparsify { keep_fraction: 0.25 },
            Defence::Quantize { bits: 4 },
        ] {
            assert_eq!(d.to_string().parse::<Defence>().unwrap(), d);
        }
    }

    #[test]
    fn bad_text_is_named() {
        for (text, part) in [
            ("clip", "needs max_norm"),
            ("clip(max_norm=x)", "not a number"),
            ("clip(max_norm=1", "closing"),
            ("blur(radius=1)", "unknown defence"),
            ("clip(max_norm=1, extra=2)", "no parameter 'extra'"),
            ("quantize(bits=2.5)", "whole number"),
        ] {
            let e = text.parse::<Defence>().unwrap_err().to_string();
            assert!(e.contains(part), "{text}: {e}");
        }
        assert!(matches!("clip(max_norm=-1)".parse::<Defence>(), Err(DefenceError::InvalidParameter { .. })));
    }
}
