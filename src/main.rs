use clap::Parser;
use runledger::{
    App,
    config::{Cli, Command},
};
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = match cli.command {
        Some(Command::Serve(config)) => config,
        Some(Command::Bench(args)) => {
            runledger::bench::run(args).await?;
            return Ok(());
        }
        None => runledger::config::Config::new_from_env()?,
    };
    runledger::telemetry::init(config.log_format);

    let app = App::build(config).await?;
    let token = app.shutdown_token();
    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        token.cancel();
    });
    app.run_until_stopped().await?;
    Ok(())
}
