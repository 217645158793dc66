//! `wasm-fixup fix MODULE [OUT]`: rewrites the shifts that wasmtime 0.38 (APISIX) miscompiles,
//! checks that none is left, writes OUT (default: MODULE). `wasm-fixup check MODULE`: lists them,
//! exits 1 if there is any. See the library's documentation for the why.

use std::process::ExitCode;

fn run() -> Result<bool, Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [cmd, input, rest @ ..] if cmd == "fix" && rest.len() <= 1 => {
            let mut module = std::fs::read(input)?;
            let rewritten = agentgate_wasm_fixup::fix(&mut module)?;
            let left = agentgate_wasm_fixup::findings(&module)?;
            for f in &left {
                eprintln!("{input}: {f}");
            }
            let out = rest.first().unwrap_or(input);
            std::fs::write(out, &module)?;
            println!("{out}: {rewritten} i32.shl by 1..=3 rewritten as i32.mul (wasmtime 0.38), {} left", left.len());
            Ok(left.is_empty())
        }
        [cmd, input] if cmd == "check" => {
            let module = std::fs::read(input)?;
            let found = agentgate_wasm_fixup::findings(&module)?;
            for f in &found {
                eprintln!("{input}: {f}");
            }
            println!("{input}: {} shifts that wasmtime 0.38 can fold into an address", found.len());
            Ok(found.is_empty())
        }
        _ => Err("usage: wasm-fixup fix MODULE [OUT] | wasm-fixup check MODULE".into()),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("wasm-fixup: {e}");
            ExitCode::from(2)
        }
    }
}
